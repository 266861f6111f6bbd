"""Clustered experts in fixed-shape slot tensors (paper section 3.2).

Slot ``s = g * K + j`` is position j of group g. Which expert sits in which slot is a table
kept by the layer; a regroup rewrites slot *contents* (never the module structure), so the
optimizer keeps the same parameters for the whole run.

Two phases:
* burn-in: each slot holds a full expert (``full[w1]``, ``full[w2]`` [, ``full[w3]``]), unless
  ``burn_in_form="compressed"``: then there are no full experts and burn-in trains the compressed form;
* compressed: each group holds a base per matrix, each slot rank-r factors, ``W = base + A B^T``.

Matrices are stored ``(d_in, d_out)`` (``x @ W``). Gated experts (SwiGLU-style) have a gate
``w1``, an up projection ``w3`` and a down projection ``w2``: ``w2(act(x w1) * (x w3))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .compression import decompose_groups
from .quant import fake_quant

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu,
               "identity": lambda x: x}   # identity: Linear -> Linear experts (DeepSpeed's MoE tests use them)
_SUPPORTED_ACTS = "GELU(approximate='none' or 'tanh'), ReLU, SiLU, Identity, or none between the Linear layers"


def activation_name(module: nn.Module) -> str:
    """The name in ACTIVATIONS of an activation module, read with its arguments: GELU's
    ``approximate`` picks the exact or the tanh form (``inplace`` changes nothing). Exact types
    only: a subclass may compute something else. Anything else raises one ValueError naming it."""
    kind = type(module)
    if kind is nn.GELU and module.approximate in ("none", "tanh"):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.Identity:
        return "identity"
    raise ValueError(f"expert activation {module!r} is not supported; supported: {_SUPPORTED_ACTS}")


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


@dataclass
class ExpertSpec:
    """What one expert FFN looks like."""
    hidden_size: int
    ffn_hidden_size: int
    activation: str = "gelu"
    gated: bool = False
    bias: bool = True

    def __post_init__(self):
        activation_fn(self.activation)
        for name in ("hidden_size", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def matrices(self) -> Dict[str, tuple]:
        d, f = self.hidden_size, self.ffn_hidden_size
        shapes = {"w1": (d, f), "w2": (f, d)}
        if self.gated:
            shapes["w3"] = (d, f)
        return shapes

    @property
    def biases(self) -> Dict[str, int]:
        if not self.bias:
            return {}
        d, f = self.hidden_size, self.ffn_hidden_size
        out = {"b1": f, "b2": d}
        if self.gated:
            out["b3"] = f
        return out


_SUPPORTED = ("an nn.Sequential (or a module with such children) of Linear(d, f), optionally an activation "
              f"({_SUPPORTED_ACTS}) and Dropout, then Linear(f, d); or a gated FFN with Linear layers named "
              "w1/w3/w2 or gate_proj/up_proj/down_proj and at most one activation child (SiLU when it has "
              "none): act(w1 x) * w3 x, then w2")


def spec_from_module(expert: nn.Module, hidden_size: int):
    """Read an expert FFN module as DeepSpeed users pass it.

    Returns ``(spec, weights)`` where weights maps matrix/bias names to tensors in our
    ``(d_in, d_out)`` layout. The spec computes the module's own function (activation variants
    included); anything else raises one ValueError saying what is supported.
    """
    if not isinstance(expert, nn.Module):
        raise ValueError(f"expert must be an nn.Module FFN, got {type(expert).__name__}; supported: {_SUPPORTED}")
    if isinstance(expert, nn.Linear):
        # Every matrix of our experts is a group base plus rank-r residuals, and the kernels run
        # two GEMMs around an activation; a one-matrix expert would need its own form throughout.
        raise ValueError(f"a bare nn.Linear expert ({expert!r}) is not supported: experts are two-matrix FFNs; "
                         f"pass nn.Sequential(nn.Linear(d, f), nn.Linear(f, d)) (activation optional) instead")
    named = dict(expert.named_children())
    linears = [(n, m) for n, m in named.items() if type(m) is nn.Linear]
    rest = [m for m in named.values() if type(m) is not nn.Linear and not isinstance(m, nn.Dropout)]
    for attr in ("activation", "act_fn", "act"):
        fn = getattr(expert, attr, None)
        if callable(fn) and not isinstance(fn, nn.Module):
            raise ValueError(f"expert.{attr} is a function ({fn!r}), which cannot be read; make it an activation "
                             f"module ({_SUPPORTED_ACTS})")
    gate_names = [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")]
    for g, u, dn in gate_names:
        if all(type(named.get(n)) is nn.Linear for n in (g, u, dn)) and len(linears) == 3 and len(rest) <= 1:
            gate, up, down = named[g], named[u], named[dn]
            # LLaMA-style modules that call F.silu in forward hold no activation child
            act_name = activation_name(rest[0]) if rest else "silu"
            f = gate.out_features
            _check_linear(gate, hidden_size, f, g)
            _check_linear(up, hidden_size, f, u)
            _check_linear(down, f, hidden_size, dn)
            bias = _same_bias(gate, up, down)
            spec = ExpertSpec(hidden_size, f, act_name, gated=True, bias=bias)
            weights = {"w1": gate.weight.t(), "w3": up.weight.t(), "w2": down.weight.t()}
            if bias:
                weights.update(b1=gate.bias, b3=up.bias, b2=down.bias)
            return spec, weights
    if len(linears) == 2 and len(rest) <= 1:
        if isinstance(expert, nn.Sequential):
            # a Sequential's order is its function: Linear, [activation], Linear (Dropout anywhere)
            order = [m for m in expert if not isinstance(m, nn.Dropout)]
            if type(order[0]) is not nn.Linear or type(order[-1]) is not nn.Linear:
                raise ValueError(f"expert {expert!r}: expected Linear, activation, Linear in this order")
        elif not rest:
            # a custom module's forward may apply F.gelu & co. between its Linears: only a
            # Sequential says that nothing is there
            raise ValueError(f"expert {type(expert).__name__} holds two Linear layers and no activation module, so "
                             f"what its forward applies between them cannot be read; hold the activation as a child "
                             f"module ({_SUPPORTED_ACTS}) or pass an nn.Sequential")
        (n1, l1), (n2, l2) = linears
        f = l1.out_features
        _check_linear(l1, hidden_size, f, n1)
        _check_linear(l2, f, hidden_size, n2)
        bias = _same_bias(l1, l2)
        spec = ExpertSpec(hidden_size, f, activation_name(rest[0]) if rest else "identity", gated=False, bias=bias)
        weights = {"w1": l1.weight.t(), "w2": l2.weight.t()}
        if bias:
            weights.update(b1=l1.bias, b2=l2.bias)
        return spec, weights
    raise ValueError(f"unsupported expert module {type(expert).__name__} "
                     f"(children: {[type(m).__name__ for m in named.values()]}); supported: {_SUPPORTED}")


def _same_bias(*layers: nn.Linear) -> bool:
    if len({lin.bias is None for lin in layers}) != 1:
        raise ValueError("expert Linear layers must all have a bias or all have none")
    return layers[0].bias is not None


def _check_linear(lin: nn.Linear, d_in: int, d_out: int, name: str) -> None:
    if lin.in_features != d_in or lin.out_features != d_out:
        raise ValueError(f"expert layer {name!r} is Linear({lin.in_features}, {lin.out_features}); "
                         f"expected Linear({d_in}, {d_out}) for hidden_size={d_in}")


def initial_expert(spec: ExpertSpec, seed: int, layer_index: int, expert: int) -> Dict[str, torch.Tensor]:
    """Expert ``expert``'s initial weights and biases, nn.Linear's kaiming-uniform bounds. They depend
    only on (seed, layer, expert index): never on rank or ep_size."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + layer_index * 10_007 + expert * 101 + 17) % (2 ** 63 - 1))
    w = {name: (torch.rand(di, do, generator=gen) * 2 - 1) * (1.0 / math.sqrt(di))
         for name, (di, do) in spec.matrices.items()}
    for name, n in spec.biases.items():
        fan_in = spec.ffn_hidden_size if name == "b2" else spec.hidden_size
        w[name] = (torch.rand(n, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    return w


class ExpertSlots(nn.Module):
    """Parameters of the experts of one layer held here, in slot order.

    Under expert parallelism a rank holds only its own groups: ``G`` is the number of LOCAL
    groups, ``group_offset`` the global index of the first one (0 without expert parallelism),
    ``num_experts = G * K`` the local slots; local slot s is global slot ``group_offset * K + s``.
    """
    draw_initial = True   # False while integrations/hf.py builds layers it fills with trained experts

    def __init__(self, spec: ExpertSpec, num_groups: int, experts_per_group: int, rank: int,
                 seed: int, layer_index: int = 0, group_offset: int = 0, burn_in_form: str = "full",
                 gamma=None, svd: str = "exact"):
        super().__init__()
        self.spec, self.G, self.K, self.rank = spec, num_groups, experts_per_group, rank
        self.group_offset, self.layer_index, self.gamma, self.svd = int(group_offset), layer_index, gamma, svd
        self.num_experts = E = num_groups * experts_per_group
        # burn_in_form="compressed": ``full`` stays empty (ZeRO-3 cannot gather zero-size parameters)
        self.full_storage = burn_in_form == "full"
        # full (E, d_in, d_out); base (G, d_in, d_out); A factors fa (E, d_in, r), B factors fb (E, d_out, r)
        self.full, self.base, self.fa, self.fb, self.bias = (nn.ParameterDict() for _ in range(5))
        for name, (di, do) in spec.matrices.items():
            if self.full_storage:
                self.full[name] = nn.Parameter(torch.empty(E, di, do))
            self.base[name] = nn.Parameter(torch.zeros(num_groups, di, do))
            self.fa[name] = nn.Parameter(torch.zeros(E, di, rank))
            self.fb[name] = nn.Parameter(torch.zeros(E, do, rank))
        for name, n in spec.biases.items():
            self.bias[name] = nn.Parameter(torch.empty(E, n))
        # one group at a time: K experts' initial weights are the most a compressed start holds
        for g in range(num_groups if ExpertSlots.draw_initial else 0):
            # the expert index is global (slot table starts as the identity): same weights at any ep_size
            self.load_group(g, [initial_expert(spec, seed, layer_index, (self.group_offset + g) * experts_per_group + j)
                                for j in range(experts_per_group)])

    @torch.no_grad()
    def load_group(self, g: int, members: List[Dict[str, torch.Tensor]]) -> None:
        """Local group ``g`` takes these K experts (slot order), in our (d_in, d_out) layout: as full
        weights, or without full storage as their decomposition (base = mean, rank-r factors of
        each member's residual, the first clustering's arithmetic; ``gamma`` and ``svd`` as there)."""
        K = self.K
        for name in self.spec.biases:
            self.bias[name][g * K:(g + 1) * K].copy_(torch.stack([w[name] for w in members]))
        for name in self.spec.matrices:
            stacked = torch.stack([w[name] for w in members])
            if self.full_storage:
                self.full[name][g * K:(g + 1) * K].copy_(stacked)
                continue
            seed = 7919 * self.layer_index + self.group_offset + g   # global group: the same at any ep_size
            dec = decompose_groups(stacked.to(torch.promote_types(stacked.dtype, torch.float32)), self.rank,
                                   self.gamma, self.svd, seed)
            self.base[name][g].copy_(dec.base)
            self.fa[name][g * K:(g + 1) * K].copy_(dec.a)
            self.fb[name][g * K:(g + 1) * K].copy_(dec.b)

    def load_expert_weights(self, per_expert: List[Dict[str, torch.Tensor]]) -> None:
        """Weights of existing experts (expert e -> slot e) in our (d_in, d_out) layout."""
        for g in range(self.G):
            self.load_group(g, per_expert[g * self.K:(g + 1) * self.K])

    def matrices(self, compressed: bool) -> List[nn.Parameter]:
        """The expert matrices of one form: bases and factors, or the burn-in full weights."""
        return [*self.base.values(), *self.fa.values(), *self.fb.values()] if compressed else list(self.full.values())

    def expert_parameters(self, compressed: bool) -> List[nn.Parameter]:
        return self.matrices(compressed) + list(self.bias.values())

    @torch.no_grad()
    def effective_weights(self, compressed: bool, read=lambda p: p.detach()) -> Dict[str, torch.Tensor]:
        """Each slot's current weights ``(E, d_in, d_out)`` in at least float32 (float64 stays
        float64), base + A B^T when compressed: :meth:`slot_weights` of every slot."""
        every = torch.arange(self.num_experts)
        return {name: self.slot_weights(name, every, compressed, read) for name in self.spec.matrices}

    @torch.no_grad()
    def slot_weights(self, name: str, slots: torch.Tensor, compressed: bool,
                     read=lambda p: p.detach()) -> torch.Tensor:
        """The effective weights of matrix ``name`` of the given LOCAL slots only,
        ``(len(slots), d_in, d_out)`` in at least float32 (float64 stays float64):
        ``base[slot // K] + A[slot] B[slot]^T`` when compressed, else the full weights' rows.
        A regroup after the first clustering builds only its movers' weights with it, never all E.
        Slot by slot (one matmul each): a slot's bits never depend on which other slots are asked
        for, so a subset is bitwise the same rows as :meth:`effective_weights`."""
        if not compressed:
            full = read(self.full[name])
            return full.index_select(0, slots.to(full.device)).to(torch.promote_types(full.dtype, torch.float32))
        dt = torch.promote_types(self.base[name].dtype, torch.float32)
        base, a, b = read(self.base[name]), read(self.fa[name]), read(self.fb[name])
        out = torch.empty(len(slots), *base.shape[1:], dtype=dt, device=base.device)
        for i, s in enumerate(slots.tolist()):
            torch.matmul(a[s].to(dt), b[s].to(dt).t(), out=out[i])
            out[i].add_(base[s // self.K].to(dt))
        return out

    def weight_chunks(self, compressed: bool, read=lambda p: p.detach(), with_base: bool = True,
                      max_elems: int = 1 << 20):
        """Every slot's effective weights as ``(offset, chunk [slots, n])``: the slots' flattened
        matrices (in ``spec.matrices`` order) cut into runs of whole rows, ``offset`` the run's first
        flat coordinate. A pass over the weights holds one chunk (about ``max_elems`` elements), never
        the full ``(E, d_in, d_out)`` tensors. ``with_base=False``: the residuals ``A B^T`` only."""
        offset = 0
        for name, (di, do) in self.spec.matrices.items():
            rows = max(1, max_elems // max(1, self.num_experts * do))
            for r0 in range(0, di, rows):
                r1 = min(di, r0 + rows)
                if compressed:
                    dt = torch.promote_types(self.base[name].dtype, torch.float32)
                    a = read(self.fa[name])[:, r0:r1].to(dt)
                    w = a @ read(self.fb[name]).to(dt).transpose(-1, -2)          # (slots, rows, d_out)
                    if with_base:
                        base = read(self.base[name])[:, r0:r1].to(dt)
                        w = (w.view(self.G, self.K, r1 - r0, do) + base.unsqueeze(1)).view(self.num_experts, r1 - r0, do)
                else:
                    full = read(self.full[name])
                    w = full[:, r0:r1].to(torch.promote_types(full.dtype, torch.float32))
                yield offset + r0 * do, w.reshape(self.num_experts, -1)
            offset += di * do

    # --- forward -------------------------------------------------------------------------
    residual_bits = 16  # set by the layer from its config; 4 = forward sees INT4 factors (core/quant.py)
    recompute = False   # set by the layer (recompute_experts): the backward recomputes the forward below

    def residual(self, p: torch.Tensor) -> torch.Tensor:
        """A factor as the forward sees it: the master, or its INT4 value (straight-through grad)."""
        return fake_quant(p) if self.residual_bits == 4 else p

    def param_views(self):
        """``(base, fa, fb, bias)``: name -> per-group / per-slot tensors of the compressed form."""
        # unbind once: indexing a stacked parameter per expert would make autograd allocate a
        # full-size zero gradient for every slice (E x the expert weights per step).
        return ({n: p.unbind(0) for n, p in self.base.items()},
                {n: self.residual(p).unbind(0) for n, p in self.fa.items()},
                {n: self.residual(p).unbind(0) for n, p in self.fb.items()},
                {n: p.unbind(0) for n, p in self.bias.items()})

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():   # keeps only the inputs for the backward
            return checkpoint(self.compute, *args, use_reentrant=False, **kwargs)
        return self.compute(*args, **kwargs)

    def compute(self, x_pairs: torch.Tensor, pair_group_counts: List[int], row_pair: torch.Tensor,
                row_weight: torch.Tensor, slot_counts: List[int], compressed: bool, views=None) -> torch.Tensor:
        """Compute stage. Inputs come from the dispatch stage: x_pairs (P, d): one row per (token,
        chosen group), sorted by group; pair_group_counts: rows per group; row_pair/row_weight (R,): one
        row per (pair, chosen expert), sorted by slot, with its combine weight; slot_counts: rows per slot.
        ``views``: compressed weights from elsewhere (the offload store), as :meth:`param_views`
        returns them; only the groups and slots that receive rows are read.
        Returns (P, d): sum over the pair's chosen experts of w_i * expert_i(x).
        """
        act = ACTIVATIONS[self.spec.activation]
        P, d = x_pairs.shape
        gated = self.spec.gated
        # Every group and slot runs, zero rows included, so the autograd graph (which parameters
        # get a gradient, in which order) is the same whatever the routing. Only the offload
        # store's views skip groups without rows: those may not be resident, and serve no backward.
        every = views is None
        if compressed:
            base, fa, fb, bias = views if views is not None else self.param_views()
        else:
            bias = {n: p.unbind(0) for n, p in self.bias.items()}
            full = {n: p.unbind(0) for n, p in self.full.items()}
        row_x = x_pairs.index_select(0, row_pair)
        if compressed:
            # Base GEMMs once per (token, group): W_base x is shared by the k chosen experts.
            split_x = x_pairs.split(pair_group_counts)
            f = self.spec.ffn_hidden_size
            base1 = torch.cat([xg @ base["w1"][g] if every or len(xg) else xg.new_zeros(0, f)
                               for g, xg in enumerate(split_x)])
            base3 = torch.cat([xg @ base["w3"][g] if every or len(xg) else xg.new_zeros(0, f)
                               for g, xg in enumerate(split_x)]) if gated else None
            row_b1 = base1.index_select(0, row_pair)
            row_b3 = base3.index_select(0, row_pair) if gated else None
        h_rows, extra_rows = [], []
        # split, not per-slot slicing: the backward of a slice allocates a zero tensor the size
        # of the whole input for every slot; split's backward is one concatenation.
        xs_per, w_per = row_x.split(slot_counts), row_weight.split(slot_counts)
        b1_per = row_b1.split(slot_counts) if compressed else None
        b3_per = row_b3.split(slot_counts) if compressed and gated else None
        for s, n in enumerate(slot_counts):
            if n == 0 and not every:
                continue
            xs, w = xs_per[s], w_per[s].unsqueeze(-1).to(x_pairs.dtype)
            if compressed:
                pre = b1_per[s] + (xs @ fa["w1"][s]) @ fb["w1"][s].t()
                if gated:
                    up = b3_per[s] + (xs @ fa["w3"][s]) @ fb["w3"][s].t()
            else:
                pre = xs @ full["w1"][s]
                if gated:
                    up = xs @ full["w3"][s]
            if "b1" in bias:
                pre = pre + bias["b1"][s]
            h = act(pre)
            if gated:
                if "b3" in bias:
                    up = up + bias["b3"][s]
                h = h * up
            hw = h * w
            if compressed:
                # Low-rank part of the down projection, per expert; the base part is applied
                # once per pair below: sum_i w_i W_base h_i = W_base sum_i w_i h_i.
                y = (hw @ fa["w2"][s]) @ fb["w2"][s].t()
                h_rows.append(hw)
            else:
                y = hw @ full["w2"][s]
            if "b2" in bias:
                y = y + w * bias["b2"][s]
            extra_rows.append(y)
        out = x_pairs.new_zeros(P, d)
        if not extra_rows:
            return out
        out = out.index_add(0, row_pair, torch.cat(extra_rows).to(out.dtype))  # bf16 under autocast
        if compressed:
            h_sum = x_pairs.new_zeros(P, self.spec.ffn_hidden_size).index_add(0, row_pair, torch.cat(h_rows).to(x_pairs.dtype))
            split_h = h_sum.split(pair_group_counts)
            out = out + torch.cat([hg @ base["w2"][g] if every or len(hg) else hg.new_zeros(0, d)
                                   for g, hg in enumerate(split_h)])
        return out
