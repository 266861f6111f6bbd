"""ZeRO stage 3 (and ZeRO-Infinity's parameter offload) for our layer.

DeepSpeed 0.19 refuses every ``deepspeed.moe.layer.MoE`` at stage 3 and runs only its AutoEP layer
there. What AutoEP needs from stage 3 is what we need: expert parameters partitioned over their
expert-data-parallel group (never over the whole data-parallel group, which would reduce-scatter
different experts' gradients across the wrong ranks), dense ones over the data-parallel group, and
a module whose parameter use changes from step to step fetched as a whole. So:

* our expert parameters carry AutoEP's placement tags (``ds_zero_placement_family``,
  ``ds_zero_partition_group_name``): the engine's own ``_resolve_zero3_param_placement`` then
  partitions them over the expert-data-parallel group;
* each ``ClusteredMoE`` is a ZeRO-3 leaf module (``deepspeed.utils.set_z3_leaf_module``): its
  parameters are gathered together before its forward, so a regroup (which changes which slots a
  forward touches) never breaks ZeRO-3's trace of the fetch order;
* ``DeepSpeedEngine._validate_zero3_moe_compatibility`` (private) lets a model whose only MoE layers
  are ours through, with the refusals AutoEP has that apply to us as well;
* :class:`Zero3ParamIO`: regroups rewrite a parameter in all three places stage 3 keeps it: the
  gathered ``p.data`` of the running forward, this rank's partition ``p.ds_tensor`` (what the next
  gather reads), and the fp32 master and Adam moments (``safe_set_full_*``).

The private names this leans on are listed in docs/guides/deepspeed.md ("DeepSpeed internals we
lean on") with the DeepSpeed versions tested; ``tests/test_zero3.py`` fails when they change.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List

import torch
import torch.nn as nn

from .deepspeed_engine import DeepSpeedParamIO

PLACEMENT_FAMILY = "autoep_expert"   # AutoEP's family name: the one the engine resolves to the edp group


def tag_expert_parameters(params: Iterable[nn.Parameter], group_name: str) -> None:
    """Stage 3: partition these over the expert-data-parallel group ``group_name`` (AutoEP's tags)."""
    for p in params:
        p.ds_zero_placement_family = PLACEMENT_FAMILY
        p.ds_zero_partition_group_name = group_name


def is_zero3_parameter(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _gathered(p: torch.Tensor) -> bool:
    return p.numel() == p.ds_numel and (p.ds_numel > 0 or p.data.shape == p.ds_shape)


@contextlib.contextmanager
def gathered_parameters(params: Iterable[nn.Parameter]):
    """The stage-3 parameters among ``params`` gathered for the block (those already gathered, as in
    a leaf module's forward, are left as they are), then partitioned again without writing back:
    :class:`Zero3ParamIO` has already written each change into its partition."""
    fetch = [p for p in params if is_zero3_parameter(p) and not _gathered(p)]
    if fetch:
        fetch[0].all_gather(param_list=fetch)
    try:
        yield
    finally:
        if fetch:
            fetch[0].partition(param_list=fetch, has_been_updated=False)


def _write_partition(p: torch.Tensor, value: torch.Tensor) -> None:
    """This rank's slice of ``value`` into ``p.ds_tensor`` (partitions are ``ds_tensor.ds_numel``
    elements each, in partition-group rank order, the last one padded)."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus
    size = p.ds_tensor.ds_numel
    start = size * dist.get_rank(group=p.ds_process_group)
    count = max(0, min(size, p.ds_numel - start))
    on_nvme = p.ds_tensor.final_location == OffloadDeviceEnum.nvme   # ZeRO-Infinity's offload_param
    swapped_out = on_nvme and p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE
    if swapped_out:
        p.nvme_swapper.swap_in([p], async_op=False)
    if count:
        with torch.no_grad():
            p.ds_tensor.narrow(0, 0, count).copy_(value.reshape(-1).narrow(0, start, count).to(p.ds_tensor.dtype))
    if on_nvme:
        # the file is the partition: write it back (the swapper's name notwithstanding, a
        # synchronous swap_out_and_release keeps the buffer), and free the buffer we took
        p.nvme_swapper.swap_out_and_release([p], async_op=False)
        if swapped_out:
            p.nvme_swapper.remove_partition_and_release_buffers([p])


class Zero3ParamIO(DeepSpeedParamIO):
    """Regroup reads and writes under ZeRO stage 3. Reads come from the fp32 masters (gathered over
    the parameter's partition group: a collective, and every rank regroups at the same step in the
    same order); writes go to the gathered forward copy, this rank's partition and the masters."""

    def read(self, p):
        from deepspeed.utils import safe_get_full_fp32_param
        if not is_zero3_parameter(p):
            return p.detach()
        if p.requires_grad:
            return safe_get_full_fp32_param(p).to(p.device)
        if not _gathered(p):
            raise RuntimeError(f"a frozen ZeRO-3 parameter of shape {tuple(p.ds_shape)} was read outside a gather")
        return p.detach()

    def _has_state(self, p, key) -> bool:
        # stage 3 keeps the state per flat fp32 sub-group: none before the first step
        # (read_state, inherited, agrees on it over the world)
        opt = p._z3_optimizer
        group = opt.grad_position[opt.get_param_id(p)][0]
        return key in opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[group], {})

    def write(self, p, value, rule):
        from deepspeed.utils import safe_set_full_fp32_param
        if not is_zero3_parameter(p):
            return super().write(p, value, rule)
        if _gathered(p):
            p.data.copy_(value.reshape(p.ds_shape).to(p.dtype))
        _write_partition(p, value)
        if not p.requires_grad:
            return
        safe_set_full_fp32_param(p, value.float().reshape(p.ds_shape).to(p.device))
        self._write_states(p, rule)

    def release(self, p):
        raise RuntimeError("ZeRO-3 cannot free burn-in experts inside its flat partitions: "
                           "use burn_in_form='compressed' under ZeRO stage 3")


# --- checkpoints ----------------------------------------------------------------------------
# DeepSpeed writes an MoE layer's experts from ``module.state_dict()`` on the expert-data-parallel
# writer ranks only, after partitioning every parameter: under stage 3 that would be empty
# tensors, and gathering there would be a collective that the other ranks never join. So the
# engine's save gathers our layers' parameters first, on every rank, one layer at a time, and the
# shell's state-dict hook writes those copies (:func:`saved_values`). A load takes the full
# tensors from the files into this rank's partitions itself (:func:`take_loaded` /
# :func:`apply_loaded`): a partitioned parameter cannot take a full tensor through
# ``load_state_dict``. Checkpoints therefore hold whole experts per global slot at every stage.

def stash_for_save(shells) -> None:
    """Before ``engine.save_checkpoint``, on every rank: each shell keeps full copies of its
    partitioned parameters (gathered over their partition groups, one layer at a time)."""
    for shell in shells:
        params = [(n, p) for n, p in shell.named_parameters() if is_zero3_parameter(p)]
        with gathered_parameters([p for _, p in params]):
            shell.__dict__["_zero3_saved"] = {n: p.detach().clone() for n, p in params}


def drop_stash(shells, key: str) -> None:
    for shell in shells:
        shell.__dict__.pop(key, None)


def saved_values(shell, state, prefix: str) -> None:
    """In the shell's state-dict hook: the full copies :func:`stash_for_save` made."""
    for name, value in shell.__dict__.get("_zero3_saved", {}).items():
        if prefix + name in state:
            state[prefix + name] = value


def take_loaded(shell, state, prefix: str) -> None:
    """In the shell's load pre-hook: full tensors meant for partitioned parameters are kept aside
    (applied by :func:`apply_loaded` once DeepSpeed's load is done) and replaced by the empty
    tensor the partitioned parameter is between forwards."""
    taken = {}
    for name, p in shell.named_parameters():
        value = state.get(prefix + name)
        if is_zero3_parameter(p) and torch.is_tensor(value) and value.numel() == p.ds_numel and value.numel():
            taken[name] = value
            state[prefix + name] = value.new_empty(0)
    if taken:
        shell.__dict__["_zero3_loaded"] = taken


def apply_loaded(shells, masters: bool) -> None:
    """After ``engine.load_checkpoint``: the loaded tensors into this rank's partitions, and into
    the fp32 masters when the optimizer state did not come with them (``masters``: module-only
    loads; a full load restores masters and moments from ZeRO's own files)."""
    from deepspeed.utils import safe_set_full_fp32_param
    for shell in shells:
        params = dict(shell.named_parameters())
        for name, value in shell.__dict__.pop("_zero3_loaded", {}).items():
            p = params[name]
            _write_partition(p, value)
            if masters and p.requires_grad:
                safe_set_full_fp32_param(p, value.float().reshape(p.ds_shape).to(p.device))


def _layers_of(model: nn.Module):
    from .deepspeed_layer import DeepSpeedStyleMoE
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DeepSpeedStyleMoE)]


def check_stage3_model(engine) -> bool:
    """Whether ``engine``'s MoE layers are all ours (then stage 3 may proceed); raises one clear
    error for what stage 3 cannot run with them."""
    from deepspeed.moe.layer import MoE
    ours = _layers_of(engine.module)
    ours_ids = {id(m) for _, m in ours}
    others = [n for n, m in engine.module.named_modules() if isinstance(m, MoE) and id(m) not in ours_ids]
    if not ours or others:
        return False
    for name, layer in ours:
        if layer.config.burn_in_form != "compressed" and layer.config.low_rank:
            raise ValueError(f"{name}: ZeRO stage 3 needs burn_in_form='compressed' (the \"trilemma_moe\" section's "
                             f"burn_in_form): stage 3 keeps burn-in experts in its flat partitions and cannot free "
                             f"them after the first clustering")
        untagged = [n for n, p in layer.moe.experts.named_parameters()
                    if getattr(p, "ds_zero_placement_family", None) != PLACEMENT_FAMILY]
        if untagged:
            raise RuntimeError(f"{name}: expert parameters {untagged[:3]} lost their ZeRO-3 placement tags")
    if engine.sequence_parallel_size != 1:
        raise ValueError("ZeRO stage 3 with TrilemmaMoE layers does not support sequence parallelism")
    if engine.zero_quantized_gradients():
        raise ValueError("ZeRO stage 3 with TrilemmaMoE layers does not support zero_quantized_gradients")
    if getattr(engine._config.zero_config, "zero_hpz_partition_size", 1) > 1:
        raise ValueError("ZeRO stage 3 with TrilemmaMoE layers does not support zero_hpz_partition_size > 1")
    return True


def permit_stage3() -> None:
    """Let ``deepspeed.initialize`` take models whose MoE layers are all ours at stage 3 (once per
    process; other MoE layers keep DeepSpeed's own refusal)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine._validate_zero3_moe_compatibility
    if getattr(original, "_trilemma_permits", False):
        return

    def _validate_zero3_moe_compatibility(engine):
        if engine.has_moe_layers and check_stage3_model(engine):
            return None
        return original(engine)
    _validate_zero3_moe_compatibility._trilemma_permits = True
    _validate_zero3_moe_compatibility.__wrapped__ = original
    DeepSpeedEngine._validate_zero3_moe_compatibility = _validate_zero3_moe_compatibility


def zero3_layers(model: nn.Module) -> List[nn.Module]:
    return [m for _, m in _layers_of(model) if any(is_zero3_parameter(p) for p in m.parameters())]
