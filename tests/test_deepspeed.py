"""TrilemmaMoE as a DeepSpeed MoE drop-in: constructor, tags, errors, and training under
``deepspeed.initialize`` at ZeRO 0/1/2 across regroups that move experts (one process, gloo)."""

import copy

import deepspeed
import pytest
import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
from trilemma_moe.core.experts import spec_from_module
from trilemma_moe.integrations.deepspeed import (DeepSpeedParamIO, attach_engine, moe_param_groups,
                                                 replace_moe_layers)
from trilemma_moe.kernels import fused, reference

D, F, V = 16, 32, 40


@pytest.fixture(scope="module", autouse=True)
def _world(dist_world_1):  # conftest: a one-process gloo world for deepspeed.initialize
    yield


def ffn(d=D, f=F, act=None, bias=True):
    """Linear -> act -> Linear (default GELU); ``act=nn.Identity()`` or ``"none"``: Linear -> Linear."""
    mid = [] if act == "none" else [nn.GELU() if act is None else act]
    return nn.Sequential(nn.Linear(d, f, bias=bias), *mid, nn.Linear(f, d, bias=bias))


def small_config(**kw):
    # the paper's similarity without move cost: these tests force groupings through the centroids;
    # dynamic_regroup=True (the library's default clusters once): they train through regroup checks
    base = dict(num_experts=8, num_groups=2, rank=4, burn_in=2, recluster_interval=2, delta=0.0, seed=3,
                regroup_similarity="weights", regroup_move_cost=0.0, dynamic_regroup=True)
    base.update(kw)
    return TrilemmaMoEConfig(**base)


class TinyLM(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.moe = moe
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        h = self.emb(idx)
        y, l_aux, _ = self.moe(h)
        logits = self.head(h + y)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1)) + l_aux


def test_is_a_deepspeed_moe_and_returns_its_tuple():
    layer = TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config())
    assert isinstance(layer, MoE)
    assert layer.num_experts == 8 and layer.config.top_k == 2 and layer.num_local_experts == 8
    out, l_aux, counts = layer(torch.randn(3, 5, D))
    assert out.shape == (3, 5, D) and l_aux.dim() == 0 and counts.shape == (8,)
    assert int(counts.sum()) == 3 * 5 * 2
    assert layer.group_assignment().shape == (8,)
    for key in ("load_cv", "group_load_cv", "reclusters", "compression_ratio"):
        assert key in layer.stats()


def test_knobs_as_keywords_and_expert_tags():
    layer = TrilemmaMoE(D, ffn(), num_experts=8, k=1, num_groups=4, rank=2, alpha=0.5)
    assert (layer.config.num_groups, layer.config.rank, layer.config.alpha, layer.config.top_k) == (4, 2, 0.5, 1)
    expert_params = list(layer.moe.experts.parameters())
    assert expert_params and all(p.allreduce is False and p.group_name == "ep_size_1" for p in expert_params)
    router = list(layer.moe.router.parameters())
    assert all(getattr(p, "allreduce", True) for p in router)


def test_experts_start_distinct_not_deep_copies():
    layer = TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config())
    w = layer.moe.experts.full["w1"]
    for i in range(1, 8):
        assert not torch.equal(w[0], w[i])


class SubclassedGELU(nn.GELU):
    """An activation module we cannot vouch for: its forward may compute anything."""


class FunctionalFFN(nn.Module):
    """Two Linears and GELU applied in forward: nothing in the module says so."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, F), nn.Linear(F, D)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("bad, match", [
    (lambda: TrilemmaMoE(D, nn.Linear(D, D), num_experts=8, k=2, config=small_config()), "bare nn.Linear"),
    (lambda: TrilemmaMoE(D, nn.Conv1d(D, D, 1), num_experts=8, k=2, config=small_config()), "unsupported expert"),
    (lambda: TrilemmaMoE(D, ffn(d=D + 1), num_experts=8, k=2, config=small_config()), "hidden_size"),
    (lambda: TrilemmaMoE(D, ffn(), num_experts=8, ep_size=2, k=2, config=small_config()), "ep_size"),
    (lambda: TrilemmaMoE(D, ffn(), num_experts=6, k=2, num_groups=4), "num_experts"),
    (lambda: TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config(), use_residual=True), "use_residual"),
    # activations we do not compute, or compute differently, are refused by name
    (lambda: TrilemmaMoE(D, ffn(act=nn.LeakyReLU()), num_experts=8), r"LeakyReLU\(negative_slope"),
    (lambda: TrilemmaMoE(D, ffn(act=nn.Softplus()), num_experts=8), r"activation Softplus"),
    (lambda: TrilemmaMoE(D, ffn(act=nn.GELU(approximate="foo")), num_experts=8), r"GELU\(approximate='foo'\)"),
    (lambda: TrilemmaMoE(D, ffn(act=SubclassedGELU()), num_experts=8), "SubclassedGELU"),
    (lambda: TrilemmaMoE(D, GatedFFN(act=nn.Tanh()), num_experts=8), r"activation Tanh"),
    (lambda: TrilemmaMoE(D, GatedFFN(act=nn.functional.gelu), num_experts=8), "expert.act_fn is a function"),
    (lambda: TrilemmaMoE(D, nn.Sequential(nn.GELU(), nn.Linear(D, F), nn.Linear(F, D)), num_experts=8), "in this order"),
    (lambda: TrilemmaMoE(D, nn.Sequential(nn.Linear(D, F, bias=False), nn.Linear(F, D)), num_experts=8), "bias"),
    (lambda: TrilemmaMoE(D, FunctionalFFN(), num_experts=8), "FunctionalFFN holds two Linear layers and no activation"),
    # k against a config or knob that says otherwise; shapes no structure rule can serve
    (lambda: TrilemmaMoE(D, ffn(), num_experts=8, k=1, config=small_config()), r"k=1 but config.top_k=2"),
    (lambda: TrilemmaMoE(D, ffn(), num_experts=8, k=1, top_k=2), r"k=1 but top_k=2"),
    (lambda: TrilemmaMoE(D, ffn(), num_experts=6, ep_size=4), r"ep_size \(4\) must divide num_experts \(6\)"),
    (lambda: TrilemmaMoE(D, ffn(), num_experts=4, ep_size=4, k=2), r"k \(2\) must be <= num_experts / ep_size = 1"),
])
def test_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_wrong_hidden_size_at_forward():
    layer = TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config())
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, D + 2))


def _plant_centroids(layer):
    """Task similarity that pairs expert i with expert i+4: a grouping the contiguous one is not."""
    moe = layer.moe
    E = moe.num_experts
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(2, D, generator=gen)
    for e in range(E):
        moe.centroids[e] = protos[e % 2] + 0.01 * torch.randn(D, generator=gen)
    moe.centroid_seen.fill_(True)


def _engine(stage, seed=0, **cfg_kw):
    torch.manual_seed(seed)
    model = TinyLM(TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config(**cfg_kw)))
    ds_config = {"train_batch_size": 4, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds_config)
    assert attach_engine(engine) == 1
    return engine, model


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_trains_under_deepspeed_zero_across_regroups(stage):
    engine, model = _engine(stage, alpha=0.0)
    layer = model.moe
    if stage > 0:
        assert isinstance(layer.moe.io, DeepSpeedParamIO)
    data = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):  # burn-in 2 steps, first clustering at step 2, regroups after
        loss = engine(data)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert layer.moe.compressed and layer.stats()["reclusters"] >= 1
    # Force a regroup that really moves experts, then check DeepSpeed's state followed it.
    _plant_centroids(layer)
    vec = layer.moe.router.expert_vec
    before_vec = vec.detach().clone()
    before_m = safe_get_full_optimizer_state(vec, "exp_avg") if stage > 0 else \
        engine.optimizer.state[vec]["exp_avg"].clone()
    slot_before = layer.moe.slot_of_expert().clone()
    # expert parameters sit in DeepSpeed's second (MoE) parameter group: their moments follow too
    bias, fa = layer.moe.experts.bias["b1"], layer.moe.experts.fa["w1"]
    before_bias_m = layer.moe.io.read_state(bias, "exp_avg") if stage > 0 else \
        engine.optimizer.state[bias]["exp_avg"].clone()
    assert before_bias_m is not None and float(before_bias_m.abs().max()) > 0
    assert layer.recluster(force=True)
    slot_after = layer.moe.slot_of_expert()
    assert layer.stats()["moved_experts"] > 0
    after_m = safe_get_full_optimizer_state(vec, "exp_avg") if stage > 0 else engine.optimizer.state[vec]["exp_avg"]
    torch.testing.assert_close(vec.detach()[slot_after], before_vec[slot_before], rtol=0, atol=0)
    torch.testing.assert_close(after_m[slot_after], before_m[slot_before], rtol=0, atol=0)
    # what the optimizer holds (DeepSpeed's own reader) is what the regroup wrote: bias moments moved
    # with their expert, the fresh factors' first moments reset where the slot's expert changed
    after_bias_m = safe_get_full_optimizer_state(bias, "exp_avg") if stage > 0 else engine.optimizer.state[bias]["exp_avg"]
    torch.testing.assert_close(after_bias_m[slot_after], before_bias_m[slot_before], rtol=0, atol=0)
    fa_m = safe_get_full_optimizer_state(fa, "exp_avg") if stage > 0 else engine.optimizer.state[fa]["exp_avg"]
    moved = layer.moe.expert_of_slot != layer.moe.expert_of_slot.new_tensor(
        slot_before.argsort().tolist())   # slots whose expert changed
    assert moved.any() and float(fa_m[moved].abs().max()) == 0.0
    if stage > 0:  # the fp32 masters hold what the module holds, so the next step does not undo the regroup
        for p in layer.parameters():
            if p.numel() and getattr(p, "_hp_mapping", None) is not None:
                torch.testing.assert_close(safe_get_full_fp32_param(p), p.detach().float(), rtol=0, atol=0)
    for _ in range(4):
        loss = engine(data)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # the step right after the forced regroup did not spike
    assert losses[6] < 1.10 * losses[5]


def test_zero_stages_agree():
    """Same seed, same data: ZeRO-1 and ZeRO-2 give the same loss curve through regroups, and
    follow ZeRO-0 exactly through burn-in. After the first clustering ZeRO-0 (a plain torch AdamW)
    keeps one Adam step counter per tensor, DeepSpeed's flat partitions one per group, so the
    bias correction of the freshly written compressed parameters differs: close, not equal."""
    curves = []
    for stage in (0, 1, 2):
        engine, model = _engine(stage, seed=5)
        data = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2))
        curve = []
        for _ in range(7):
            loss = engine(data)
            engine.backward(loss)
            engine.step()
            curve.append(float(loss.detach()))
        assert model.moe.stats()["reclusters"] >= 2
        curves.append(torch.tensor(curve))
    torch.testing.assert_close(curves[2], curves[1], rtol=1e-5, atol=1e-6)
    burn_in = 2
    torch.testing.assert_close(curves[1][:burn_in + 1], curves[0][:burn_in + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-2, atol=1e-3)


def test_config_from_deepspeed_json_sets_accumulation(tmp_path):
    import json
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
                                "trilemma_moe": {"num_experts": 8, "num_groups": 2, "rank": 4}}))
    cfg = TrilemmaMoEConfig.from_deepspeed_config(str(path))
    assert (cfg.gradient_accumulation_steps, cfg.grad_clip, cfg.num_groups) == (2, 0.5, 2)


class DSModel(nn.Module):
    def __init__(self, num_experts=8, expert=None, k=2):
        super().__init__()
        self.block = nn.ModuleDict({"moe": MoE(D, expert or ffn(), num_experts=num_experts, k=k)})

    def forward(self, x):
        return self.block["moe"](x)


# every activation module (and variant argument) an expert may hold -> the function we must compute;
# "none": no activation module (Linear -> Linear; a gated module then applies SiLU in its forward)
ACTS = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(inplace=True),
        "silu": nn.SiLU(), "identity": nn.Identity(), "none": "none"}


def expert_module(act, gated=False, bias=True, names=("gate_proj", "up_proj", "down_proj")):
    a = ACTS[act] if act == "none" else copy.deepcopy(ACTS[act])
    if gated:
        return GatedFFN(act=None if a == "none" else a, bias=bias, names=names)
    return ffn(act=a, bias=bias)


def slot_function(layer, slot, x, compressed=False, use_fused=False):
    """What slot ``slot`` of the layer computes for rows x, every row routed to it alone with weight
    1: the per-slot compute stage, or (compressed) the fused path through the kernels' torch twins."""
    slots = layer.moe.experts
    T, group = x.shape[0], slot // slots.K
    if use_fused:
        return fused.fused_expert_forward(slots, x, torch.full((T, 1), group), torch.full((T, 1, 1), slot),
                                          torch.ones(T, 1, 1, dtype=x.dtype), ops=reference)
    pairs = [T if g == group else 0 for g in range(slots.G)]
    rows = [T if s == slot else 0 for s in range(slots.num_experts)]
    return slots(x, pairs, torch.arange(T), torch.ones(T, dtype=x.dtype), rows, compressed)


def assert_slots_compute(layer, modules, x, compressed=False, use_fused=False, tol=1e-12):
    """Expert e of the layer (wherever its slot is now) computes ``modules[e]`` on x."""
    slot_of = layer.moe.slot_of_expert().tolist()
    with torch.no_grad():
        for e, m in enumerate(modules):
            torch.testing.assert_close(slot_function(layer, slot_of[e], x, compressed, use_fused), m(x),
                                       rtol=tol, atol=tol, msg=lambda msg: f"expert {e}: {msg}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_converted_experts_compute_the_modules_function(act, gated, bias):
    """A layer read from expert modules computes each module's own function (float64, fresh random
    inputs): full weights in burn-in; after the first clustering at rank = min(d, d_ff) (exact
    residuals, no gate) on the per-slot path and through the fused kernels."""
    torch.manual_seed(11)
    modules = [expert_module(act, gated, bias).double() for _ in range(4)]
    layer = TrilemmaMoE(D, modules[0], num_experts=4, k=1, num_groups=2, rank=min(D, F), gamma=None).double()
    want = {"none": "silu" if gated else "identity"}.get(act, act)
    assert (layer.moe.spec.activation, layer.moe.spec.gated, layer.moe.spec.bias) == (want, gated, bias)
    layer.moe.experts.load_expert_weights([spec_from_module(m, D)[1] for m in modules])
    x = 2 * torch.randn(9, D, dtype=torch.float64)
    assert_slots_compute(layer, modules, x)
    assert layer.recluster(force=True) and layer.moe.compressed
    assert_slots_compute(layer, modules, x, compressed=True, tol=1e-9)
    assert_slots_compute(layer, modules, x, compressed=True, use_fused=True, tol=1e-9)


@pytest.mark.parametrize("expert", ["gelu", "gelu_tanh", "relu", "none", "gated_silu"])
def test_replace_moe_layers_uses_trained_expert_weights(expert):
    gated = expert.startswith("gated")
    model = DSModel(expert=expert_module(expert.split("_", 1)[1] if gated else expert, gated=gated)).double()
    experts = model.block["moe"].deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():  # make them distinct, as after training
        for i, e in enumerate(experts):
            for j, p in enumerate(e.parameters()):
                p.add_(0.1 * (i + 1) * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(j)))
    replaced = replace_moe_layers(model, small_config())
    assert replaced == 1
    new = model.block["moe"]
    assert isinstance(new, TrilemmaMoE) and new.moe.spec.gated == gated
    # every DeepSpeed expert's function, on fresh inputs, is what its slot computes now
    assert_slots_compute(new, list(experts), torch.randn(7, D, dtype=torch.float64))
    out, l_aux, counts = model(torch.randn(2, 3, D, dtype=torch.float64))
    assert out.shape == (2, 3, D) and counts.shape == (8,)


def test_replace_untrained_identical_experts_warns_and_seeds():
    model = DSModel()
    with pytest.warns(UserWarning, match="identical"):
        replace_moe_layers(model, small_config())
    w = model.block["moe"].moe.experts.full["w1"]
    assert not torch.equal(w[0], w[1])


def test_replace_checks_expert_count():
    with pytest.raises(ValueError, match="num_experts"):
        replace_moe_layers(DSModel(num_experts=4), small_config())


def test_deepspeed_accepts_a_config_holding_our_section():
    """One JSON for both: DeepSpeed ignores the "trilemma_moe" section, we read it."""
    ds_config = {"train_batch_size": 4, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": 1},
                 "trilemma_moe": {"num_experts": 8, "num_groups": 4, "rank": 2, "burn_in": 1}}
    cfg = TrilemmaMoEConfig.from_deepspeed_config(ds_config)
    model = TinyLM(TrilemmaMoE(D, ffn(), config=cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=ds_config)
    attach_engine(engine)
    data = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        loss = engine(data)
        engine.backward(loss)
        engine.step()
    assert model.moe.config.num_groups == 4 and model.moe.stats()["compressed"]


class GatedFFN(nn.Module):
    """The LLaMA-style expert users pass: act(gate_proj x) * up_proj x, then down_proj. ``act=None``
    holds no activation child and applies SiLU in forward (what we then assume); a plain function
    as ``act_fn`` cannot be read."""

    def __init__(self, d=D, f=F, act=nn.SiLU(), bias=False, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((d, f), (d, f), (f, d))):
            setattr(self, name, nn.Linear(i, o, bias=bias))
        self.act_fn = act

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        act = self.act_fn if self.act_fn is not None else nn.functional.silu
        return down(act(gate(x)) * up(x))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_gated_expert_module_is_read_as_gated(names):
    modules = [GatedFFN(names=names, act=nn.GELU(approximate="tanh")).double() for _ in range(8)]
    layer = TrilemmaMoE(D, modules[0], num_experts=8, k=2, config=small_config()).double()
    spec = layer.moe.spec
    assert spec.gated and spec.activation == "gelu_tanh" and not spec.bias and spec.ffn_hidden_size == F
    assert set(layer.moe.experts.full.keys()) == {"w1", "w2", "w3"}
    layer.moe.experts.load_expert_weights([spec_from_module(m, D)[1] for m in modules])
    assert_slots_compute(layer, modules, torch.randn(6, D, dtype=torch.float64))
    out, _, counts = layer(torch.randn(5, D, dtype=torch.float64))
    assert out.shape == (5, D) and int(counts.sum()) == 10


def test_capacity_arguments_warn_that_routing_is_dropless():
    with pytest.warns(UserWarning, match="dropless"):
        TrilemmaMoE(D, ffn(), num_experts=8, k=2, config=small_config(), capacity_factor=1.25)
