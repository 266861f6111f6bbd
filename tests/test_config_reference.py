"""The configuration reference (docs/reference/config.md) says what the config does: every knob of
TrilemmaMoEConfig has a row in trilemma_moe/config_doc.KNOB_DOC and a comment in config.py, every
documented range is the one the config enforces, the generated page shows each knob with its real
default, and the page's YAML, JSON and Python examples load as written."""
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from trilemma_moe.config import TrilemmaMoEConfig
from trilemma_moe.config_doc import KNOB_DOC, Described, Interval, OneOf

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "config.md"
FIELDS = [f.name for f in dataclasses.fields(TrilemmaMoEConfig)]

# Knobs whose values at a range's edge need other knobs set to be valid at all.
CONTEXT = {
    "num_experts": {"num_groups": 1, "top_k": 1},          # E = 1 holds one group of one expert
    "regroup_trigger": {"dynamic_regroup": True},          # "drift" needs regroup checks
}


def _extension():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "_ext" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXT = _extension()


# --- the table covers the config, and the config is commented --------------------------------------

def test_every_knob_has_a_row_and_no_row_is_stale():
    missing = [name for name in FIELDS if name not in KNOB_DOC]
    stale = [name for name in KNOB_DOC if name not in FIELDS]
    assert not missing, f"knobs without a row in trilemma_moe/config_doc.py KNOB_DOC: {missing}"
    assert not stale, f"KNOB_DOC rows naming no field of TrilemmaMoEConfig: {stale}"


def test_every_knob_has_a_comment_and_a_section():
    knobs = EXT.knobs()
    assert [k.name for k in knobs] == FIELDS
    assert not [k.name for k in knobs if not k.description], "fields without a comment in config.py"
    assert not [k.name for k in knobs if not k.section], "fields above the first '# --- section' comment"


def test_comments_are_read_whole():
    by_name = {k.name: k for k in EXT.knobs()}
    # a continuation line ("#   ...") belongs to the field above it, and nothing else does
    assert by_name["burn_in_form"].description.endswith("(memory: no full weights, gradients or optimizer "
                                                        "moments at any step)")
    assert by_name["dynamic_regroup"].description.startswith("True: regroup checks")
    assert by_name["alpha"].section.startswith("online dual-similarity clustering")
    assert by_name["ep_size"].section.startswith("expert parallelism")


# --- the documented range is the enforced one --------------------------------------------------------

def _cases(kind):
    for name in FIELDS:
        if name not in KNOB_DOC:
            continue                               # test_every_knob_has_a_row_and_no_row_is_stale names it
        spec = KNOB_DOC[name].allowed
        for value in (spec.outside() if kind == "outside" else spec.inside()):
            yield pytest.param(name, value, id=f"{name}={value!r}")


def _build(name, value, via_dict=False):
    knobs = dict(CONTEXT.get(name, {}), **{name: value})
    return TrilemmaMoEConfig.from_dict(knobs) if via_dict else TrilemmaMoEConfig(**knobs)


def test_every_range_is_checkable():
    for name in KNOB_DOC:
        spec = KNOB_DOC[name].allowed
        assert isinstance(spec, (Interval, OneOf, Described)), name
        assert spec.outside() and spec.inside(), f"{name}: no value outside or inside its documented range"


@pytest.mark.parametrize("name,value", _cases("outside"))
@pytest.mark.parametrize("via_dict", [False, True], ids=["constructor", "from_dict"])
def test_a_value_outside_the_documented_range_is_refused_naming_the_knob(name, value, via_dict):
    with pytest.raises(ValueError) as info:
        _build(name, value, via_dict)
    assert re.search(rf"\b{name}\b", str(info.value)), f"{name}={value!r}: error names another knob: {info.value}"


@pytest.mark.parametrize("name,value", _cases("inside"))
def test_a_value_inside_the_documented_range_is_accepted(name, value):
    built = getattr(_build(name, value), name)
    assert built == value or value is None and name == "recluster_interval"   # None: derived from E


def test_just_outside_means_just_outside():
    # the edges the cases above probe, spelled out for the kinds of range in the table
    assert Interval(0, 1).outside()[-3:] == (-1e-6, 1 + 1e-6, None)
    assert 0 in Interval(0, 1, low_open=True).outside() and 1 in Interval(0, 1, low_open=True).inside()
    assert 0 in Interval(1, integer=True).outside() and 1 in Interval(1, integer=True).inside()
    assert None in Interval(1, integer=True, optional=True).inside()
    assert {True, 17} <= set(OneOf((4, 16)).outside())


# --- the generated page ------------------------------------------------------------------------------

def _entries(page):
    """knob name -> its part of the generated Markdown (from its label to the next one)."""
    parts = re.split(r"^\(knob-(\w+)\)=$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_page_shows_every_knob_with_its_real_default_type_and_range():
    entries = _entries(EXT.render_markdown())
    assert list(entries) == FIELDS
    for field in dataclasses.fields(TrilemmaMoEConfig):
        entry = entries[field.name]
        assert f"### `{field.name}`" in entry
        row = next(line for line in entry.splitlines() if line.startswith("| `"))
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert cells[1] == f"`{EXT.default_text(field.default)}`", (field.name, cells)
        assert cells[0].strip("`").replace("\\|", "|").split(" | ")[0] in str(field.type), (field.name, cells)
        if field.name not in KNOB_DOC:
            continue
        assert cells[3] == EXT._escape(KNOB_DOC[field.name].symbol), (field.name, cells)
        assert KNOB_DOC[field.name].allowed.describe().split(";")[0].split("`")[0] in cells[2], (field.name, cells)


def test_the_page_defaults_are_the_constructed_ones():
    built = TrilemmaMoEConfig()
    shown = {k.name: k.default for k in EXT.knobs()}
    for name in FIELDS:
        if name != "recluster_interval":           # None on the page: derived from num_experts when built
            assert shown[name] == getattr(built, name), name
    assert shown["recluster_interval"] is None and built.recluster_interval == 100


def test_a_new_knob_appears_by_itself():
    @dataclasses.dataclass
    class Extended:
        # --- structure ---
        alpha: float = 0.7     # weight of S_param
        extra_knob: int = 3    # what a new knob does,
        #   over two lines
    knobs = EXT.knobs(Extended)
    assert [(k.name, k.default, k.description, k.section) for k in knobs][-1] == \
        ("extra_knob", 3, "what a new knob does, over two lines", "structure")
    assert "(knob-extra_knob)=" in EXT.render_markdown(Extended)


# --- the page's examples ------------------------------------------------------------------------------

def _blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", PAGE.read_text(), re.S | re.M)


def test_the_page_uses_the_directive():
    assert "```{trilemma-config-reference}" in PAGE.read_text()


def test_the_page_examples_load_as_written(tmp_path, monkeypatch):
    yaml_blocks, json_blocks, python_blocks = _blocks("yaml"), _blocks("json"), _blocks("python")
    assert len(yaml_blocks) == 2 and len(json_blocks) == 1 and len(python_blocks) == 1
    for i, text in enumerate(yaml_blocks):
        (tmp_path / f"knobs{i}.yaml").write_text(text)
        TrilemmaMoEConfig.from_yaml(tmp_path / f"knobs{i}.yaml")
    (tmp_path / "knobs.yaml").write_text(yaml_blocks[0])
    ds = json.loads(json_blocks[0])
    cfg = TrilemmaMoEConfig.from_deepspeed_config(ds)
    assert (cfg.gradient_accumulation_steps, cfg.grad_clip, cfg.offload_dir) == (2, 1.0, "/local_nvme")
    (tmp_path / "ds_config.json").write_text(json_blocks[0])
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks[0], str(PAGE), "exec"), {})
