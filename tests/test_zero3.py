"""ZeRO stage 3 and ZeRO-Infinity with our layer (integrations/deepspeed_zero3.py).

The distributed cases (world 4 x ep 1/2/4, client optimizer, gradient parity, checkpoints, ZeRO-2
vs ZeRO-3 pairs) run in tests/test_peer_matrix.py; the main job under the launcher with
ds_configs/zero3.json in tests/test_launch.py. Here: ZeRO-Infinity's NVMe round trip through a
regroup, the refusals, and the private DeepSpeed names the integration leans on."""
import inspect
import json
import pathlib
import sys

import pytest
import torch
import torch.nn as nn

from test_peer_matrix import run_spawned

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFINITY = ROOT / "tests" / "scripts" / "zero3_infinity.py"


def test_zero_infinity_keeps_regrouped_experts_on_nvme(tmp_path):
    """2 gloo ranks, bf16, parameters and optimizer state on NVMe (the expert bases really there):
    through the first clustering and a regroup between steps that rewrites the bases, the loss
    curve and parameters equal the same run with everything in memory (see the script)."""
    results = run_spawned(INFINITY, 2, ["nvme"], tmp_path, timeout=600)
    r = results["nvme"][0]
    assert r["moved"] > 0 and r["curve_nvme"] == r["curve_memory"]
    assert r["swap_files"], "no parameter was swapped to NVMe"


def _tiny_model(moe):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            y, l_aux, _ = self.moe(x)
            return y.square().mean() + l_aux
    return Net()


def _stage3(model):
    import deepspeed
    from trilemma_moe.integrations.deepspeed import moe_param_groups
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=cfg)


def test_stage3_refuses_a_full_burn_in_naming_the_knob(dist_world_1):
    from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
    moe = TrilemmaMoE(16, nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), num_experts=4, k=2,
                      config=TrilemmaMoEConfig(num_experts=4, num_groups=2, rank=2))
    with pytest.raises(ValueError, match="burn_in_form='compressed'"):
        _stage3(_tiny_model(moe))


def test_stage3_still_refuses_deepspeeds_own_moe(dist_world_1):
    """The permit covers models whose MoE layers are all ours; DeepSpeed's own keeps its refusal."""
    from deepspeed.moe.layer import MoE
    moe = MoE(16, nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), num_experts=2, k=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            return self.moe(x)[0].square().mean()
    with pytest.raises(AssertionError, match="Native DeepSpeed MoE is not supported with ZeRO Stage 3"):
        _stage3(Net())


def test_the_private_deepspeed_names_we_lean_on_are_there():
    """docs/guides/deepspeed.md ("DeepSpeed internals we lean on") lists these; a DeepSpeed that renames one fails here
    with its name rather than deep inside a stage-3 run."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
    from deepspeed.runtime.zero import partition_parameters, stage3
    import trilemma_moe.integrations.deepspeed  # noqa: F401  (installs the permit)

    validate = DeepSpeedEngine._validate_zero3_moe_compatibility
    assert getattr(validate, "_trilemma_permits", False), "our stage-3 permit is not installed"
    assert "Native DeepSpeed MoE is not supported" in inspect.getsource(validate.__wrapped__)
    placement = inspect.getsource(DeepSpeedEngine._resolve_zero3_param_placement)
    for name in ("ds_zero_placement_family", "autoep_expert", "ds_zero_partition_group_name"):
        assert name in placement, name
    assert "ds_zero_partition_process_group" in inspect.getsource(partition_parameters)
    for name in ("set_full_hp_param", "get_full_hp_param", "fp32_partitioned_groups_flat", "grad_position"):
        assert name in inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3), name
    for name in ("swap_in", "swap_out_and_release", "remove_partition_and_release_buffers"):
        assert callable(getattr(AsyncPartitionedParameterSwapper, name, None)), name
    # all_gather/partition are the methods ZeRO-3 gives each parameter
    assert "def all_gather(" in inspect.getsource(partition_parameters.Init._convert_to_deepspeed_param)
