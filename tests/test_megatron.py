"""Our layer inside Megatron-core, one process (gloo world of 1): the TransformerConfig mapping,
the shell against the float64 reference and the DeepSpeed layer, a GPTModel built from
gpt_layer_spec training through the first clustering and regroups (Megatron's aux-loss tracker,
allreduce tags, Adam moments moved by MegatronParamIO), a distributed-checkpoint round trip and
Megatron-LM's --spec entry. Two and more ranks: test_megatron_ep.py."""
import argparse
import os
import socket
import sys

import pytest
import torch

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    track_moe_metrics,
)
from megatron.core.utils import GlobalMemoryBuffer

from trilemma_moe.core.routing import aux_losses
from trilemma_moe.integrations.deepspeed_layer import DeepSpeedStyleMoE
from trilemma_moe.integrations.megatron import (
    TrilemmaMegatronMoE,
    gpt_layer_spec,
    spec_for_megatron_lm,
)
from trilemma_moe.integrations.megatron_config import trilemma_config
from trilemma_moe.integrations.megatron_cpu import cpu_attention_substitutes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import megatron_ep as M
from layer_reference import _perturb, _ref_forward, _temp

ORIGINAL_GET_TENSOR = GlobalMemoryBuffer.get_tensor


@pytest.fixture(scope="module", autouse=True)
def megatron_world_1():
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("needs a one-process world")
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture
def megatron_attention_on_cpu():
    """FOR MEGATRON'S ATTENTION ONLY: its two CUDA-only calls get CPU equivalents (megatron_cpu.py)."""
    with cpu_attention_substitutes():
        yield


def test_transformer_config_maps_onto_our_knobs_and_conflicts_name_both():
    cfg = trilemma_config(M.transformer_config(moe_router_topk=1, moe_router_pre_softmax=True), {"rank": 4, "burn_in": 7})
    assert (cfg.num_experts, cfg.num_groups, cfg.top_k, cfg.group_top_k) == (8, 4, 1, 1)
    assert (cfg.aux_loss_coef, cfg.z_loss_coef, cfg.ep_size, cfg.rank, cfg.burn_in) == (0.01, 0.001, 1, 4, 7)
    unset = M.transformer_config(moe_router_num_groups=None, moe_router_group_topk=None, moe_z_loss_coeff=None)
    assert trilemma_config(unset, {"num_groups": 2}).num_groups == 2    # Megatron unset: ours decides
    assert trilemma_config(unset, {"num_groups": 4}).z_loss_coef == 0.0                     # Megatron's None: no z-loss
    for knobs in ({"num_groups": 2}, M.KNOBS | {"num_groups": 2}):
        with pytest.raises(ValueError, match=r"moe_router_num_groups=4 conflicts with trilemma num_groups=2"):
            gpt_layer_spec(M.transformer_config(), knobs)
    from trilemma_moe.config import TrilemmaMoEConfig
    with pytest.raises(ValueError, match=r"moe_aux_loss_coeff=0.01 conflicts with trilemma aux_loss_coef=0.5"):
        trilemma_config(M.transformer_config(), TrilemmaMoEConfig(num_experts=8, num_groups=4, aux_loss_coef=0.5))
    with pytest.raises(ValueError, match=r"moe_shared_expert_intermediate_size=32: shared experts"):
        trilemma_config(M.transformer_config(moe_shared_expert_intermediate_size=32))
    with pytest.raises(ValueError, match=r"recompute_granularity='full'.*count its routing statistics twice"):
        trilemma_config(M.transformer_config(recompute_granularity="full", recompute_method="uniform",
                                             recompute_num_layers=1))
    with pytest.raises(ValueError, match=r"num_moe_experts is None"):
        trilemma_config(M.transformer_config(num_moe_experts=None, moe_router_num_groups=None,
                                             moe_router_group_topk=None))
    with pytest.raises(ValueError, match=r"unknown trilemma_moe config key\(s\): rnak"):
        trilemma_config(M.transformer_config(), {"rnak": 4})


def _pair(knobs):
    """Our Megatron shell and the DeepSpeed layer over the same weights, float64."""
    config = M.transformer_config()
    shell = TrilemmaMegatronMoE(config, layer_number=1, trilemma=dict(M.KNOBS, **knobs)).double()
    ds = DeepSpeedStyleMoE(config.hidden_size, ffn_hidden_size=config.ffn_hidden_size, config=shell.moe.config,
                           layer_index=0).double()
    ds.moe.load_state_dict(shell.moe.state_dict())
    return shell, ds


def test_shell_equals_reference_and_deepspeed_layer_float64_without_substitutes():
    assert GlobalMemoryBuffer.get_tensor is ORIGINAL_GET_TENSOR    # no CPU stand-in is installed here
    shell, ds = _pair({"burn_in": 10 ** 6, "router_freeze_steps": 0})
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, dtype=torch.float64))
    try:
        _compare_with_deepspeed_layer_and_reference(shell, ds)
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None     # Megatron's own default (1)
    assert not torch.cuda.is_initialized()


def _compare_with_deepspeed_layer_and_reference(shell, ds, seed=11):
    diffs = {}
    for phase in ("burn-in", "compressed"):
        if phase == "compressed":
            assert shell.recluster(force=True) and ds.recluster(force=True)
            _perturb(shell.moe, seed=3)
            ds.moe.load_state_dict(shell.moe.state_dict())
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 3, 32, dtype=torch.float64, generator=gen)       # [s, b, h]
        pad = torch.rand(3, 6, generator=gen) < 0.3                          # [b, s], True = padding
        g = torch.randn(6, 3, 32, dtype=torch.float64, generator=gen)
        xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        temperature = _temp(shell.moe.config, shell.moe.step)     # before the forward counts a step
        y, bias = shell(xs, padding_mask=pad)
        y_ds, l_aux, _ = ds(xd, used_token=~pad.T)
        ref, _ = _ref_forward(shell.moe, x, temperature, used=~pad.T)
        assert bias is None and y.shape == x.shape
        diffs[phase] = (float((y - y_ds).detach().abs().max()), float((y.detach() - ref).abs().max()))
        # the same float64 operations as the DeepSpeed layer: equal bit for bit; the reference sums
        # in another order (measured up to 6.1e-16 over 9 seeds, on outputs of order 1)
        assert diffs[phase][0] == 0.0 and diffs[phase][1] < 1e-15, diffs
        assert float(y.detach()[pad.T].abs().max()) == 0.0                 # padding tokens get no expert output
        # the balance and z losses reach the backward through MoEAuxLossAutoScaler with scale 1,
        # as l_aux added to the loss does in the DeepSpeed layer
        (y * g).sum().backward()
        ((y_ds * g).sum() + l_aux).backward()
        grads = {n: p.grad for n, p in shell.moe.named_parameters() if p.grad is not None}
        assert any(n.startswith("router.") for n in grads)
        for n, p in ds.moe.named_parameters():
            if p.grad is not None:
                assert torch.equal(grads[n], p.grad), n
        assert torch.equal(xs.grad, xd.grad)
        shell.zero_grad(), ds.zero_grad()
    print(f"\nmax |shell - DeepSpeed layer|, |shell - float64 reference|: {diffs}")


def test_gpt_trains_through_clustering_and_regroups_into_megatrons_tracker(megatron_attention_on_cpu):
    model = M.build_gpt(1)
    opt = M.make_optimizer(model)
    layers = M.megatron_layers(model)
    assert len(layers) == 2 and all(type(lay.moe).__name__ == "ClusteredMoE" for lay in layers)
    for name, p in model.named_parameters():
        assert getattr(p, "allreduce", True) is (".moe.experts." not in name), name
    clear_aux_losses_tracker()
    # one forward: the tracker holds the unweighted balance and z losses of each layer's input
    seen = {}
    hooks = [lay.register_forward_pre_hook(lambda mod, args, kw: seen.__setitem__(mod.layer_number, args[0]),
                                           with_kwargs=True) for lay in layers]
    M.lm_loss(model, M.batch(0)).backward()
    for h in hooks:
        h.remove()
    tracker = get_moe_layer_wise_logging_tracker()
    for lay in layers:
        with torch.no_grad():
            r = lay.moe.route(seen[lay.layer_number].reshape(-1, 32))
            want = {"load_balancing_loss": aux_losses(r, 1.0, 0.0), "z_loss": aux_losses(r, 0.0, 1.0)}
        for name, value in want.items():
            assert float(tracker[name]["values"][lay.layer_number - 1]) == pytest.approx(float(value), rel=1e-5)
    opt.zero_grad()
    clear_aux_losses_tracker()

    moments_by_expert = {}

    def between(step):
        if step == M.FORCE_AFTER - 1:   # the forced regroup: Adam moments must follow their experts
            for lay in layers:
                st = opt.state[lay.moe.router.expert_vec]
                moments_by_expert[lay.layer_number] = st["exp_avg"][lay.moe.slot_of_expert()].clone()
            M.force_regroup(model)
            for lay in layers:
                st = opt.state[lay.moe.router.expert_vec]
                torch.testing.assert_close(st["exp_avg"][lay.moe.slot_of_expert()],
                                           moments_by_expert[lay.layer_number], rtol=0, atol=0)
    curve = M.train_steps(model, opt, range(M.STEPS), on_step=between)
    print("\nGPTModel loss curve (1 rank):", [round(v, 4) for v in curve])
    assert curve[-1] < curve[0] - 0.2
    for lay in layers:
        s = lay.stats()
        assert s["compressed"] and s["reclusters"] == 3 and s["step"] == M.STEPS
    assert moments_by_expert and any(lay.stats()["moved_experts"] > 0 for lay in layers)
    # Megatron's own reporting: reduce over the (one-rank) groups and average per MoE layer
    totals = {}
    track_moe_metrics(loss_scale=1.0 / M.STEPS, iteration=M.STEPS, total_loss_dict=totals, num_layers=2,
                      track_names=["load_balancing_loss", "z_loss"])
    assert set(totals) == {"load_balancing_loss", "z_loss"}
    assert 1.5 < float(totals["load_balancing_loss"]) < 3.0 and float(totals["z_loss"]) > 0


@pytest.mark.parametrize("rule", ["weights", "probe"])
def test_dist_checkpoint_round_trip_restores_the_loss(megatron_attention_on_cpu, tmp_path, rule):
    """The continued curve is the uninterrupted one, through a regroup after the load (under the
    probe rule it moves experts: the probe batch comes back with the layer's extra state)."""
    knobs = {"regroup_similarity": rule}
    model = M.build_gpt(1, knobs=knobs)
    opt = M.make_optimizer(model)
    M.train_steps(model, opt, range(M.SAVE_AFTER))
    sd = model.sharded_state_dict()
    fa = sd["decoder.layers.0.mlp.moe.experts.fa.w1"]
    # [layer axis Megatron's TransformerBlock prepends, global slots, d_in, r]; the slot axis is ours
    assert fa.global_shape == (2, 8, 32, 4) and fa.global_offset == (0, 0, 0, 0) and fa.replica_id == (0, 0, 0)
    assert sd["decoder.layers.0.mlp.moe.experts.base.w1"].global_shape == (2, 4, 32, 64)    # per group
    M.save_checkpoint(model, opt, str(tmp_path / "ckpt"))
    # the same config (its seed also seeds the k-means of later regroups), other weights:
    # everything must come from the file
    fresh = M.build_gpt(1, knobs=knobs)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    fresh_opt = M.make_optimizer(fresh)
    M.load_checkpoint(fresh, fresh_opt, str(tmp_path / "ckpt"))
    with torch.no_grad():
        model.eval(), fresh.eval()
        assert float(M.lm_loss(fresh, M.batch(99))) == float(M.lm_loss(model, M.batch(99)))
        model.train(), fresh.train()
    assert M.train_steps(fresh, fresh_opt, range(M.SAVE_AFTER, M.STEPS)) == \
        M.train_steps(model, opt, range(M.SAVE_AFTER, M.STEPS))
    if rule == "probe":
        assert all(a.stats()["experts_moved"] == b.stats()["experts_moved"] > 0
                   for a, b in zip(M.megatron_layers(fresh), M.megatron_layers(model)))


def test_spec_for_megatron_lm_reads_its_args_and_our_yaml(tmp_path, monkeypatch):
    path = tmp_path / "knobs.yaml"
    path.write_text("trilemma_moe:\n  rank: 4\n  burn_in: 50\n")
    monkeypatch.setenv("TRILEMMA_MOE_CONFIG", str(path))
    args = argparse.Namespace(transformer_impl="local", global_batch_size=32, micro_batch_size=2,
                              data_parallel_size=2)
    spec = spec_for_megatron_lm(args, M.transformer_config())
    assert spec.submodules.mlp.module is TrilemmaMegatronMoE
    knobs = spec.submodules.mlp.params["trilemma"]
    assert (knobs["rank"], knobs["burn_in"], knobs["gradient_accumulation_steps"], knobs["num_groups"]) == (4, 50, 8, 4)
    path.write_text("trilemma_moe:\n  num_groups: 2\n")
    with pytest.raises(ValueError, match="moe_router_num_groups=4 conflicts with trilemma num_groups=2"):
        spec_for_megatron_lm(args, M.transformer_config())


# --- MegatronParamIO against Megatron-core's optimizers, on the CPU -----------------------------
# Megatron's Float16OptimizerWithFloat16Params refuses CPU tensors in its __init__ and its
# DistributedOptimizer needs CUDA buffers, so these tests build instances of the real classes with
# __new__ and give them the attributes their __init__ sets; the first test fails if Megatron stops
# setting them (or renames them).
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402
from megatron.core.optimizer.optimizer import (  # noqa: E402
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    MegatronOptimizer,
)

from trilemma_moe.integrations.megatron_optim import (  # noqa: E402
    DISTRIBUTED_OPTIMIZER_REFUSAL,
    MegatronParamIO,
    masters_of,
)


def test_megatron_optimizers_still_have_the_attributes_param_io_reads():
    import inspect
    fp16_init = inspect.getsource(Float16OptimizerWithFloat16Params.__init__)
    for line in ("self.float16_groups = []", "self.fp32_from_float16_groups = []", "self.fp32_from_fp32_groups = []",
                 "param.main_param = main_param", "self.optimizer.state[main_param] = self.optimizer.state.pop(param)"):
        assert line in fp16_init, f"Megatron's Float16OptimizerWithFloat16Params no longer does {line!r}"
    assert "self.optimizer = optimizer" in inspect.getsource(MegatronOptimizer.__init__)
    assert "self.chained_optimizers = chained_optimizers" in inspect.getsource(ChainedOptimizer.__init__)
    assert "main_param_sharded = True" in inspect.getsource(DistributedOptimizer)


def _megatron_fp16_optimizer(params, inner):
    """A Float16OptimizerWithFloat16Params over ``params`` whose fp32 masters ``inner`` steps, as its
    __init__ sets it up (model parameter -> main_param, state keyed by the master)."""
    opt = Float16OptimizerWithFloat16Params.__new__(Float16OptimizerWithFloat16Params)
    masters = inner.param_groups[0]["params"]
    opt.optimizer, opt.float16_groups, opt.fp32_from_float16_groups, opt.fp32_from_fp32_groups = \
        inner, [list(params)], [list(masters)], [[]]
    for p, m in zip(params, masters):
        p.main_param = m
    return opt


def test_regroup_writes_fp32_masters_and_their_moments_like_a_plain_optimizer():
    """A layer under Megatron's mixed-precision optimizer: the regroup reads and writes the fp32
    masters, moves the Adam moments keyed by the masters, and writes the model parameters; the
    result equals the same regroup of a copy under a plain torch AdamW (float64 reference run)."""
    import copy

    from trilemma_moe.config import TrilemmaMoEConfig
    from trilemma_moe.core.layer import ClusteredMoE
    from trilemma_moe.core.state_io import TorchParamIO

    torch.manual_seed(0)
    layer = ClusteredMoE(12, 20, TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, top_k=2, burn_in=2,
                                                   recluster_interval=100, delta=0.0, seed=5)).double()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.attach_optimizer(opt)
    for _ in range(4):    # through the first clustering, with moments
        y, l_aux, _ = layer(torch.randn(16, 12, dtype=torch.float64))
        (y.square().mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    assert layer.clustered
    ref = copy.deepcopy(layer)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    params = [p for p in layer.parameters() if p.numel()]
    masters = [p.detach().clone() for p in params]
    inner = torch.optim.AdamW(masters, lr=1e-2)
    by_name = dict(layer.named_parameters())
    for (name, q) in ref.named_parameters():
        state = opt.state.get(by_name[name], {})
        ref_opt.state[q] = {k: v.clone() for k, v in state.items()}
    for p, m in zip(params, masters):
        inner.state[m] = {k: v.clone() for k, v in opt.state[p].items()}
    ref.set_param_io(TorchParamIO(ref_opt))
    layer.set_param_io(MegatronParamIO(_megatron_fp16_optimizer(params, inner)))
    with torch.no_grad():   # the same activation statistics on both: the regroup moves experts
        for m in (layer, ref):
            m.centroids.copy_(torch.randn(8, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    # what must change: the model parameters alone would be overwritten by the stale masters at
    # Megatron's next step
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    assert layer.recluster(force=True) and ref.recluster(force=True)
    assert layer.stats()["moved_experts"] > 0
    ref_params = dict(ref.named_parameters())
    changed = 0
    for (name, p), m in zip([(n, p) for n, p in layer.named_parameters() if p.numel()], masters):
        q = ref_params[name]
        assert torch.equal(p, q) and torch.equal(m, q), f"{name}: parameter or fp32 master differs"
        for key, value in ref_opt.state[q].items():
            assert torch.equal(inner.state[m][key], value), f"{name}: moment {key} differs"
        changed += not torch.equal(before[name], q)
    assert changed > 0


def test_distributed_optimizer_is_refused_with_one_clear_error():
    dist_opt = DistributedOptimizer.__new__(DistributedOptimizer)
    with pytest.raises(RuntimeError) as info:
        masters_of(dist_opt)
    assert str(info.value) == DISTRIBUTED_OPTIMIZER_REFUSAL and "use_distributed_optimizer=False" in str(info.value)
    chained = ChainedOptimizer.__new__(ChainedOptimizer)
    p = torch.nn.Parameter(torch.randn(3))
    chained.chained_optimizers = [_megatron_fp16_optimizer([p], torch.optim.AdamW([p.detach().clone()])), dist_opt]
    with pytest.raises(RuntimeError, match="DistributedOptimizer"):
        MegatronParamIO(chained)
    # a parameter whose master is a DistributedOptimizer shard, or a master the IO was not given
    sharded = torch.nn.Parameter(torch.randn(3))
    sharded.main_param, sharded.main_param_sharded = None, True
    with pytest.raises(RuntimeError, match="DistributedOptimizer"):
        MegatronParamIO(None).read(sharded)
    with pytest.raises(RuntimeError, match="attach_megatron_optimizer"):
        MegatronParamIO(None).read(p)
