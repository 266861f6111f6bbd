"""TrilemmaMoEConfig: validation (every knob named in its error), defaults of Eq. 11, loaders."""
import dataclasses
import json

import pytest

from trilemma_moe.config import TrilemmaMoEConfig


def _raises_naming(knob, **kwargs):
    with pytest.raises(ValueError) as info:
        TrilemmaMoEConfig(**kwargs)
    assert knob in str(info.value), f"error for {kwargs} does not name {knob!r}: {info.value}"
    return str(info.value)


# ------------------------------------------------------------------ validation ----------------

def test_defaults_are_valid_and_follow_the_paper():
    c = TrilemmaMoEConfig()
    assert c.experts_per_group == c.num_experts // c.num_groups
    assert c.beta == 0.05 and c.delta == 0.01 and c.burn_in == 200
    assert c.router_temperature_start == 1.0 and c.router_temperature_end == 0.7
    assert c.grad_clip == 1.0 and c.combine == "product"


@pytest.mark.parametrize("E,G", [(6, 4), (10, 3), (32, 5)])
def test_num_experts_not_divisible_by_groups(E, G):
    msg = _raises_naming("num_experts", num_experts=E, num_groups=G, top_k=1)
    assert "num_groups" in msg


def test_more_groups_than_experts():
    _raises_naming("num_groups", num_experts=4, num_groups=8, top_k=1)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 2, -1])
def test_alpha_outside_unit_interval(alpha):
    _raises_naming("alpha", alpha=alpha)


@pytest.mark.parametrize("alpha", [0, 0.0, 0.5, 1, 1.0])
def test_alpha_endpoints_accepted(alpha):
    assert TrilemmaMoEConfig(alpha=alpha).alpha == alpha


def test_top_k_larger_than_group():
    # E=32, G=8 -> K=4
    _raises_naming("top_k", num_experts=32, num_groups=8, top_k=5)
    assert TrilemmaMoEConfig(num_experts=32, num_groups=8, top_k=4).top_k == 4


def test_group_top_k_larger_than_groups():
    _raises_naming("group_top_k", num_experts=8, num_groups=2, group_top_k=3)
    assert TrilemmaMoEConfig(num_experts=8, num_groups=2, group_top_k=2).group_top_k == 2


@pytest.mark.parametrize("beta", [0, 0.0, -0.1, 1.5])
def test_beta_out_of_range(beta):
    _raises_naming("beta", beta=beta)


def test_beta_one_accepted():
    assert TrilemmaMoEConfig(beta=1.0).beta == 1.0


def test_negative_burn_in():
    _raises_naming("burn_in", burn_in=-1)
    assert TrilemmaMoEConfig(burn_in=0).burn_in == 0


def test_bad_combine():
    _raises_naming("combine", combine="sum")


@pytest.mark.parametrize("knob,value", [
    ("num_experts", 8.0), ("num_groups", "2"), ("rank", 2.5), ("top_k", True), ("group_top_k", None),
    ("burn_in", 1.0), ("recluster_interval", 10.0), ("gradient_accumulation_steps", "1"),
    ("seed", 1.5), ("kmeans_iters", False), ("router_freeze_steps", 0.5),
])
def test_non_integer_types(knob, value):
    _raises_naming(knob, **{knob: value})


@pytest.mark.parametrize("knob,value", [
    ("alpha", "0.5"), ("beta", None), ("delta", "x"), ("aux_loss_coef", True), ("gamma", "0.1"),
])
def test_non_number_types(knob, value):
    _raises_naming(knob, **{knob: value})


@pytest.mark.parametrize("knob,value", [
    ("rank", 0), ("top_k", 0), ("group_top_k", 0), ("num_experts", 0), ("num_groups", 0),
    ("delta", -0.1), ("gamma", -0.5), ("router_temperature_start", 0.0), ("router_temperature_end", -1.0),
    ("aux_loss_coef", -1e-3), ("z_loss_coef", -1.0), ("grad_clip", -1.0), ("recluster_interval", 0),
    ("gradient_accumulation_steps", 0), ("tau", 1.5), ("neighbor_top_n", 0), ("sim_cache_lifetime", 0),
    ("router_temperature_steps", -1), ("router_freeze_steps", -1), ("sim_cache_eps", -0.1),
])
def test_out_of_range_values(knob, value):
    _raises_naming(knob, **{knob: value})


# every float knob, found by its annotation so that a new one is covered too
_FLOAT_KNOBS = [f.name for f in dataclasses.fields(TrilemmaMoEConfig) if "float" in str(f.type)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("knob", _FLOAT_KNOBS)
def test_non_finite_float_knobs_rejected(knob, value):
    # NaN passes every range comparison; +inf passes the open-ended ones
    msg = _raises_naming(knob, **{knob: value})
    assert msg == f"{knob} must be a finite number, got {value}"


def test_non_finite_knob_from_deepspeed_json_rejected(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"gradient_clipping": NaN, "trilemma_moe": {"delta": Infinity}}')   # Python's json reads both
    with pytest.raises(ValueError, match="delta must be a finite number, got inf"):
        TrilemmaMoEConfig.from_deepspeed_config(p)
    p.write_text('{"gradient_clipping": NaN}')
    with pytest.raises(ValueError, match="grad_clip must be a finite number, got nan"):
        TrilemmaMoEConfig.from_deepspeed_config(p)


def test_optional_knobs_accept_none():
    c = TrilemmaMoEConfig(tau=None, neighbor_top_n=None, gamma=None)
    assert c.tau is None and c.neighbor_top_n is None and c.gamma is None


# ------------------------------------------------------------------ Eq. 11 ----------------------

@pytest.mark.parametrize("E,G,expected", [(8, 2, 100), (32, 8, 100), (256, 8, 100), (512, 8, 200),
                                          (1024, 16, 200)])
def test_recluster_interval_default(E, G, expected):
    assert TrilemmaMoEConfig(num_experts=E, num_groups=G).recluster_interval == expected


def test_recluster_interval_explicit_kept():
    assert TrilemmaMoEConfig(num_experts=512, num_groups=8, recluster_interval=37).recluster_interval == 37
    assert TrilemmaMoEConfig(num_experts=8, num_groups=2, recluster_interval=300).recluster_interval == 300


def test_check_dims_names_rank():
    c = TrilemmaMoEConfig(rank=16)
    c.check_dims(16, 64)
    with pytest.raises(ValueError, match="rank"):
        c.check_dims(8, 64)
    with pytest.raises(ValueError, match="rank"):
        c.check_dims(64, 15)


# ------------------------------------------------------------------ temperature ----------------

def test_temperature_schedule_endpoints_and_linear():
    c = TrilemmaMoEConfig(router_temperature_start=1.0, router_temperature_end=0.7, router_temperature_steps=1000)
    assert c.temperature(0) == pytest.approx(1.0, abs=1e-15)
    assert c.temperature(1000) == pytest.approx(0.7, abs=1e-15)
    assert c.temperature(10 ** 6) == pytest.approx(0.7, abs=1e-15)
    for s in (1, 250, 500, 999):
        assert c.temperature(s) == pytest.approx(1.0 + (0.7 - 1.0) * s / 1000, abs=1e-12)
    # monotone non-increasing
    vals = [c.temperature(s) for s in range(0, 1200, 7)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_temperature_zero_steps_is_constant_end():
    c = TrilemmaMoEConfig(router_temperature_start=2.0, router_temperature_end=0.5, router_temperature_steps=0)
    assert c.temperature(0) == 0.5 and c.temperature(17) == 0.5


def test_temperature_can_increase():
    c = TrilemmaMoEConfig(router_temperature_start=0.5, router_temperature_end=1.5, router_temperature_steps=4)
    assert [c.temperature(s) for s in range(6)] == pytest.approx([0.5, 0.75, 1.0, 1.25, 1.5, 1.5])


# ------------------------------------------------------------------ loaders --------------------

def test_from_dict_roundtrip_and_overrides():
    c = TrilemmaMoEConfig(num_experts=16, num_groups=4, rank=4, alpha=0.3, burn_in=5)
    d = c.to_dict()
    assert TrilemmaMoEConfig.from_dict(d) == c
    c2 = TrilemmaMoEConfig.from_dict(d, rank=2)
    assert c2.rank == 2 and c2.num_experts == 16
    assert TrilemmaMoEConfig.from_dict(None) == TrilemmaMoEConfig()


def test_from_dict_unknown_key_named():
    with pytest.raises(ValueError) as info:
        TrilemmaMoEConfig.from_dict({"num_experts": 8, "num_groups": 2, "rnak": 4})
    assert "rnak" in str(info.value)


def test_from_dict_validates():
    with pytest.raises(ValueError, match="num_experts"):
        TrilemmaMoEConfig.from_dict({"num_experts": 10, "num_groups": 4, "top_k": 1})


def test_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("num_experts: 16\nnum_groups: 4\nrank: 8\nalpha: 0.25\ngamma: null\ntau: 0.1\n")
    c = TrilemmaMoEConfig.from_yaml(p)
    assert (c.num_experts, c.num_groups, c.rank, c.alpha, c.gamma, c.tau) == (16, 4, 8, 0.25, None, 0.1)
    assert c.recluster_interval == 100
    assert TrilemmaMoEConfig.from_yaml(str(p), rank=2).rank == 2


def test_from_yaml_section_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trilemma_moe:\n  num_experts: 8\n  num_groups: 2\n  burn_in: 3\n")
    c = TrilemmaMoEConfig.from_yaml(p)
    assert (c.num_experts, c.num_groups, c.burn_in) == (8, 2, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_experts: 8\nnum_groups: 2\nbogus_knob: 1\n")
    with pytest.raises(ValueError, match="bogus_knob"):
        TrilemmaMoEConfig.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError):
        TrilemmaMoEConfig.from_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert TrilemmaMoEConfig.from_yaml(empty) == TrilemmaMoEConfig()


_DS = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 3,
    "gradient_clipping": 0.5,
    "zero_optimization": {"stage": 1},
    "trilemma_moe": {"num_experts": 16, "num_groups": 4, "rank": 4, "burn_in": 10},
}


def test_from_deepspeed_dict():
    c = TrilemmaMoEConfig.from_deepspeed_config(_DS)
    assert (c.num_experts, c.num_groups, c.rank, c.burn_in) == (16, 4, 4, 10)
    assert c.gradient_accumulation_steps == 3 and c.grad_clip == 0.5
    assert isinstance(c.gradient_accumulation_steps, int) and isinstance(c.grad_clip, float)


def test_from_deepspeed_json_file(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(_DS))
    c = TrilemmaMoEConfig.from_deepspeed_config(p)
    assert c == TrilemmaMoEConfig.from_deepspeed_config(_DS)
    assert TrilemmaMoEConfig.from_deepspeed_config(str(p), rank=2).rank == 2


def test_from_deepspeed_section_wins_over_top_level():
    ds = dict(_DS, trilemma_moe=dict(_DS["trilemma_moe"], gradient_accumulation_steps=5, grad_clip=2.0))
    c = TrilemmaMoEConfig.from_deepspeed_config(ds)
    assert c.gradient_accumulation_steps == 5 and c.grad_clip == 2.0


def test_from_deepspeed_without_section_or_top_level_knobs():
    c = TrilemmaMoEConfig.from_deepspeed_config({"train_batch_size": 8})
    assert c == TrilemmaMoEConfig()


def test_from_deepspeed_unknown_key_named():
    ds = dict(_DS, trilemma_moe={"num_experts": 8, "num_groups": 2, "not_a_knob": 1})
    with pytest.raises(ValueError, match="not_a_knob"):
        TrilemmaMoEConfig.from_deepspeed_config(ds)


# ------------------------------------------------------------------ bad sections and files ----

@pytest.mark.parametrize("section", [None, [1, 2], "num_experts: 8", 3], ids=["null", "list", "str", "int"])
@pytest.mark.parametrize("as_file", [False, True], ids=["dict", "file"])
def test_from_deepspeed_section_not_a_mapping(tmp_path, section, as_file):
    ds = {"train_batch_size": 8, "trilemma_moe": section}
    src = tmp_path / "ds.json"
    src.write_text(json.dumps(ds))
    with pytest.raises(ValueError) as info:
        TrilemmaMoEConfig.from_deepspeed_config(src if as_file else ds)
    msg = str(info.value)
    assert "'trilemma_moe'" in msg and "must be a mapping" in msg
    assert (str(src) in msg) == as_file


@pytest.mark.parametrize("key", ["trilemma-moe", "trilemmaMoE", "Trilemma_MoE", "trilemma_moe ", "TRILEMMA MOE"])
@pytest.mark.parametrize("as_file", [False, True], ids=["dict", "file"])
def test_from_deepspeed_misspelt_section(tmp_path, key, as_file):
    ds = {"train_batch_size": 8, key: {"num_experts": 8, "num_groups": 2}}
    src = tmp_path / "ds.json"
    src.write_text(json.dumps(ds))
    with pytest.raises(ValueError) as info:
        TrilemmaMoEConfig.from_deepspeed_config(src if as_file else ds)
    msg = str(info.value)
    assert repr(key) in msg and "must be called 'trilemma_moe'" in msg
    assert (str(src) in msg) == as_file


def test_from_deepspeed_file_not_json(tmp_path):
    for name, data in (("trailing_comma.json", b'{"train_batch_size": 8,}'), ("binary.json", b"\xff\xfe\x00\x81"),
                       ("list.json", b"[1, 2]")):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError) as info:
            TrilemmaMoEConfig.from_deepspeed_config(p)
        assert str(info.value).startswith(f"{p}: ")


@pytest.mark.parametrize("text,expect", [
    ("trilemma_moe:\n", "must be a mapping"), ("trilemma_moe: [1, 2]\n", "must be a mapping"),
    ("trilemma-moe:\n  num_experts: 8\n  num_groups: 2\n", "must be called 'trilemma_moe'"),
    ("Trilemma_MoE:\n  num_experts: 8\n  num_groups: 2\n", "must be called 'trilemma_moe'"),
    ("num_experts: [8\nnum_groups: 2\n", "not valid YAML"),
])
def test_from_yaml_bad_section_or_file_named(tmp_path, text, expect):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as info:
        TrilemmaMoEConfig.from_yaml(p)
    assert str(info.value).startswith(f"{p}: ") and expect in str(info.value)
