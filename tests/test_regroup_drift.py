"""regroup_trigger="drift" (core/drift.py): a regroup check runs when the per-expert load
distribution has moved by more than drift_threshold (total variation) since the last check. The
firing steps are checked against a plain float64 recomputation from the counts the layer returned;
"period" ignores the drift knobs; the knobs' errors; skipped steps and checkpoints; and, on 2 gloo
ranks with differently skewed data, replicas and expert-parallel ranks fire at the same steps."""
import json

import pytest
import torch

from layer_reference import D, _cfg, _layer
from test_expert_parallel import run_workers
from trilemma_moe import TrilemmaMoEConfig, train


def _plain_schedule(counts, burn_in, every, beta, threshold):
    """(check steps, {measured step: distance}) from the per-forward counts, by hand: an EMA of the
    counts (rate beta per forward); at step s (before its forward) after the first clustering at
    burn_in, every ``every`` steps since the last check, the total variation of the normalised EMA
    from the one at the last check; above ``threshold`` a check runs and becomes the reference."""
    ema = [0.0] * len(counts[0])
    fired, distances, ref, last = [], {}, None, None
    for s, c in enumerate(counts):
        p = [e / max(sum(ema), 1e-12) for e in ema]
        if s == burn_in:
            ref, last = p, s
        elif last is not None and (s - last) % every == 0:
            distances[s] = 0.5 * sum(abs(a - b) for a, b in zip(p, ref))
            if distances[s] > threshold:
                fired.append(s)
                ref, last = p, s
        ema = [(1 - beta) * e + beta * float(x) for e, x in zip(ema, c)]
    return fired, distances


def _shifting_batches(n, shift_at, seed=0):
    """Tokens around one mean up to ``shift_at``, then around another: the routing changes."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    return [torch.randn(24, D, generator=g, dtype=torch.float64) * 0.7 + (a if s < shift_at else b).double()
            for s in range(n)]


def _checks(layer):
    s = layer.stats()
    return s["reclusters"] + s["skipped_reclusters"]


@pytest.mark.parametrize("every,threshold", [(2, 0.03), (3, 0.08)])
def test_drift_fires_exactly_where_the_plain_statistic_crosses_the_threshold(every, threshold):
    kw = dict(burn_in=3, regroup_trigger="drift", drift_every=every, drift_threshold=threshold, drift_beta=0.3,
              delta=0.0)
    layer = _layer(_cfg(**kw))
    counts, checks, distance_after = [], [], []
    for s, x in enumerate(_shifting_batches(30, 14)):
        before = _checks(layer)
        _, _, c = layer(x)
        counts.append(c.tolist())
        if s > 3 and _checks(layer) > before:
            checks.append(s)
        distance_after.append(layer.stats()["load_drift"])
    fired, plain = _plain_schedule(counts, 3, every, 0.3, threshold)
    assert checks == fired
    assert fired and any(s >= 14 for s in fired)       # the shift is seen
    assert any(d <= threshold for d in plain.values())  # and not every measurement fires
    for s, d in plain.items():
        assert distance_after[s] == pytest.approx(d, rel=1e-9, abs=1e-12), s


def test_period_ignores_the_drift_knobs():
    """"period" (the default) runs exactly as before: the drift knobs change nothing, nothing of
    the drift state enters stats() or the checkpoint."""
    xs = _shifting_batches(16, 8, seed=1)
    runs = []
    for kw in ({}, dict(drift_threshold=1e-6, drift_every=1, drift_beta=1.0)):
        layer = _layer(_cfg(burn_in=2, recluster_interval=5, delta=0.0, **kw))
        checks, ys = [], []
        for s, x in enumerate(xs):
            n = _checks(layer)
            ys.append(layer(x)[0])
            checks += [s] if _checks(layer) > n else []
        assert layer.drift is None and "load_drift" not in layer.stats()
        assert "drift" not in layer.get_extra_state()
        runs.append((checks, torch.stack(ys)))
    assert runs[0][0] == runs[1][0] == [2, 7, 12]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("knob,value", [("regroup_trigger", "loss"), ("drift_threshold", 0.0),
                                        ("drift_threshold", 1.5), ("drift_beta", 0.0), ("drift_beta", float("nan")),
                                        ("drift_every", 0), ("drift_every", 2.5)])
def test_bad_drift_knob_is_one_error_naming_it(knob, value):
    with pytest.raises(ValueError, match=knob):
        TrilemmaMoEConfig(**{knob: value})


def test_drift_needs_dynamic_regroup():
    with pytest.raises(ValueError, match="regroup_trigger='drift'.*dynamic_regroup"):
        TrilemmaMoEConfig(regroup_trigger="drift", dynamic_regroup=False)


@pytest.mark.parametrize("config,extra,expect", [
    # a static ffn with a drift trigger: the flag named, and the ffn that checks
    (None, ["--ffn", "static"], ("--regroup-trigger drift: --ffn static", "--ffn dynamic")),
    # the config's default clusters once: the config's own error, pointing at --ffn dynamic
    (None, ["--ffn", "ours"], ("regroup_trigger='drift'", "--ffn dynamic")),
    # a config that asks for regroup checks, overridden by --ffn static
    ("dynamic_regroup: true\n", ["--ffn", "static"], ("--ffn static", "--ffn dynamic")),
    # a threshold outside (0, 1]: refused as it is parsed, naming the flag
    (None, ["--ffn", "dynamic", "--drift-threshold", "2"], ("--drift-threshold", "(0, 1]"))])
def test_trainer_refuses_drift_flags_that_cannot_work(capsys, tmp_path, config, extra, expect):
    if config is not None:
        (tmp_path / "moe.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "moe.yaml"), *extra]
    with pytest.raises(SystemExit) as exc:
        train.main(["--regroup-trigger", "drift", "--steps", "2", *extra, "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and all(e in err for e in expect), err


def test_a_skipped_step_leaves_no_trace_in_the_load_average():
    layer = _layer(_cfg(regroup_trigger="drift"))
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    layer.attach_optimizer(opt)
    xs = _shifting_batches(3, 1, seed=2)
    layer(xs[0])[0].sum().backward()
    opt.step()
    kept = layer.drift.ema.clone()
    layer(xs[1])[0].sum().backward()
    assert not torch.equal(layer.drift.ema, kept)
    layer.on_optimizer_step(applied=False)    # the engine skipped it
    assert torch.equal(layer.drift.ema, kept)


def test_drift_state_travels_with_the_checkpoint():
    cfg = _cfg(burn_in=2, regroup_trigger="drift", drift_every=2, drift_threshold=0.05)
    a, b = _layer(cfg), _layer(cfg)
    for x in _shifting_batches(9, 5, seed=3):
        a(x)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.drift.ema, a.drift.ema) and torch.equal(b.drift.ref, a.drift.ref)
    assert b.drift.distance == a.drift.distance
    for x in _shifting_batches(8, 2, seed=4):   # and both go on alike
        assert torch.equal(a(x)[0], b(x)[0]) and _checks(a) == _checks(b)


# --- two gloo ranks, each with its own skewed data (tests/scripts/ep_workers.py) ---------------
def test_ranks_fire_at_the_same_steps_and_end_with_one_grouping(tmp_path):
    res = run_workers("drift_dp,drift_ep", 2, tmp_path)
    for mode in ("drift_dp", "drift_ep"):
        r0, r1 = res[mode]
        assert r0["checks"] == r1["checks"] and r0["assignment"] == r1["assignment"], mode
        assert r0["distances"] == r1["distances"], mode
        # the statistic is the global one: recomputed from both ranks' counts (each rank's own
        # tokens), their sum per forward
        glob = [[a + b for a, b in zip(c0, c1)] for c0, c1 in zip(r0["counts"], r1["counts"])]
        fired, _ = _plain_schedule(glob, r0["burn_in"], r0["every"], r0["beta"], r0["threshold"])
        assert r0["checks"] == fired and len(fired) >= 2, mode
        # which a rank's own tokens would not give: the ranks' data are skewed differently
        assert any(_plain_schedule(r["counts"], r0["burn_in"], r0["every"], r0["beta"], r0["threshold"])[0] != fired
                   for r in (r0, r1)), mode
    assert res["drift_ep"][0]["moved"] > 0 or res["drift_dp"][0]["moved"] > 0


def test_the_trainer_runs_the_drift_trigger_from_flags_alone(tmp_path):
    """`--ffn dynamic --regroup-trigger drift` (the shift preset's drift rule) needs no config file:
    the ffn's regroup switch is part of the config the trigger is validated against."""
    out = tmp_path / "s.json"
    train.main(["--ffn", "dynamic", "--regroup-trigger", "drift", "--steps", "3", "--burn-in", "1", "--d-model", "16",
                "--d-ff", "32", "--layers", "1", "--seq-len", "8", "--batch-size", "2", "--eval-every", "0",
                "--eval-batches", "1", "--no-progress", "--summary-json", str(out)])
    cfg = json.loads(out.read_text())["config"]
    assert cfg["regroup_trigger"] == "drift" and cfg["dynamic_regroup"] is True
