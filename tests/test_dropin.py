"""TrilemmaMoE as a drop-in for ``deepspeed.moe.layer.MoE`` with MoE's own arguments only: MoE's
defaults (top-1), a structure chosen from the shapes, and what DeepSpeed's own MoE tests check
(tests/unit/v1/moe/test_moe.py) in our words: tests/scripts/dropin_train.py trains DeepSpeed's
SimpleMoEModel shape at world 2 and 4 and compares every gradient with an all-ranks float64
reference (one spawn per world size runs every case)."""
import logging
import pathlib

import pytest
import torch
import torch.nn as nn

from test_peer_matrix import run_spawned
from trilemma_moe import TrilemmaMoE, TrilemmaMoEConfig
from trilemma_moe.config import dropin_structure

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dropin_train.py"

# E:EP:ZERO per world size: ZeRO 0/1/2 at each, E in {2, 4, 8}, ep in {1, 2, 4}; K = 1 (2:2, 4:4),
# replicas of expert-parallel ranks (world 4, ep 2), experts alone on their ranks (world 4, ep 4)
CASES = {2: ["4:1:0", "2:2:1", "8:2:2"], 4: ["4:4:0", "4:2:1", "8:4:2"]}


def expert(d=16, f=16):
    return nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))


def enumerated_structure(E, ep, d, f, k):
    """The rule of dropin_structure, by listing every G and filtering: None when none serves."""
    fits = [G for G in range(1, E + 1) if E % G == 0 and G % ep == 0 and E // G >= k and G <= max(8, ep)]
    if not fits:
        return None
    with_sharing = [G for G in fits if E // G >= 2]
    return max(with_sharing) if with_sharing else max(fits), min(16, max(1, min(d, f) // 4))


def test_structure_rule_against_enumeration():
    for E in range(1, 41):
        for ep in (1, 2, 3, 4, 8, 16):
            for k in (1, 2, 3):
                for d, f in ((1, 7), (3, 64), (16, 16), (16, 32), (40, 24), (64, 256), (768, 3072)):
                    want = enumerated_structure(E, ep, d, f, k)
                    if want is None:
                        with pytest.raises(ValueError, match=r"^(ep_size|k) \("):
                            dropin_structure(E, ep, d, f, k)
                        continue
                    got = dropin_structure(E, ep, d, f, k)
                    assert got == want, (E, ep, d, f, k)
                    G, r = got
                    # what the rule chose is a valid config for those shapes
                    cfg = TrilemmaMoEConfig(num_experts=E, num_groups=G, rank=r, ep_size=ep, top_k=k)
                    cfg.check_dims(d, f)
    assert dropin_structure(32, 1, 768, 3072) == (8, 16)   # the paper's shape keeps the paper's G and r


def test_moe_arguments_alone_route_top1_and_build_common_shapes():
    """MoE's signature default is k=1: 16 tokens make 16 assignments. Shapes MoE takes (E < 8,
    hidden 16) build, with the structure the rule chose."""
    for E in (1, 2, 4, 8):
        layer = TrilemmaMoE(hidden_size=16, expert=expert(), num_experts=E)
        assert layer.config.top_k == 1
        assert (layer.config.num_groups, layer.config.rank) == dropin_structure(E, 1, 16, 16)
        out, l_aux, counts = layer(torch.randn(2, 8, 16))
        assert out.shape == (2, 8, 16) and counts.shape == (E,) and int(counts.sum()) == 16
    two = TrilemmaMoE(hidden_size=16, expert=expert(), num_experts=4, k=2)
    assert int(two(torch.randn(16, 16))[2].sum()) == 32
    assert TrilemmaMoE(hidden_size=16, expert=expert()).num_experts == 1   # MoE's num_experts=1


def test_given_config_and_knobs_are_kept():
    cfg = TrilemmaMoEConfig(num_experts=8, num_groups=2, rank=3, top_k=3)
    layer = TrilemmaMoE(16, expert(), num_experts=8, config=cfg)
    assert layer.config == cfg                     # k not passed: config.top_k applies
    assert TrilemmaMoE(16, expert(), num_experts=8, k=3, config=cfg).config == cfg
    knobs = TrilemmaMoE(16, expert(), num_experts=8, num_groups=2, rank=5).config
    assert (knobs.num_groups, knobs.rank, knobs.top_k) == (2, 5, 1)
    half = TrilemmaMoE(16, expert(), num_experts=8, num_groups=8).config   # rank alone from the rule
    assert (half.num_groups, half.rank) == (8, 4)


def test_chosen_structure_is_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="trilemma_moe.integrations.deepspeed_layer"):
        for _ in range(3):   # a model of several identical layers says it once
            TrilemmaMoE(20, expert(20, 36), num_experts=6)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "num_groups=3, rank=5" in lines[0] and "num_experts=6" in lines[0], lines


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda w: f"world{w}")
def trained(request, tmp_path_factory):
    world = request.param
    return world, run_spawned(SCRIPT, world, CASES[world], tmp_path_factory.mktemp(f"dropin{world}"), timeout=600)


def test_trains_under_deepspeed_from_moe_arguments_alone(trained):
    world, results = trained
    for case, ranks in results.items():
        E, ep, _ = (int(v) for v in case.split(":"))
        assert len(ranks) == world, case
        r = ranks[0]
        assert (r["num_groups"], r["residual_rank"], r["top_k"]) == (*dropin_structure(E, ep, 16, 16), 1), case
        losses = r["losses"]
        assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-2:]) < 0.9 * sum(losses[:2]), (case, losses)
        assert all(other["losses"] == losses for other in ranks[1:]), case


def test_gradients_match_the_all_ranks_reference(trained):
    """Expert gradients reduced over the expert-data-parallel group, dense ones over the whole
    data-parallel group: on every rank, each one equals the float64 gradient of the mean loss over
    all ranks' batches (the workers assert it; here: every parameter was compared, on every rank)."""
    world, results = trained
    for case, ranks in results.items():
        for r in ranks:
            errs = r["grad_rel_err"]
            assert {n.split(".")[0] for n in errs} == {"linear1", "moe_1", "linear2", "moe_2", "linear3"}, case
            assert any(".moe.experts." in n for n in errs) and any(".router." in n for n in errs), case
            assert max(errs.values()) < 1e-5, (case, errs)
