"""The shape of the house: imports only point down the layers, files stay small enough to read,
and the collaborators a layer is given fit the interfaces core declares (core/interfaces.py)."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from trilemma_moe.core import interfaces
from trilemma_moe.core.experts import ExpertSlots
from trilemma_moe.core.offload import CPUTier, StoredSlots
from trilemma_moe.core.state_io import TorchParamIO
from trilemma_moe.parallel.comm import ExpertParallelComm

PACKAGE = Path(__file__).resolve().parents[1] / "trilemma_moe"
# bottom to top: a package may import only from those before it
LAYERS = ["config", "kernels", "core", "parallel", "integrations", "models", "data", "training", "train", "reproduce", "cli"]
EXEMPT_FROM_SIZE = {"kernels/triton_moe.py"}   # the Triton kernels: one file per the kernels' shared tiles
MAX_LINES = 400


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else ""


def _imported_packages(path: Path):
    text = path.read_text()
    depth_up = len(path.relative_to(PACKAGE).parts) - 1   # ".." from a subpackage reaches the top
    for m in re.finditer(r"^\s*from\s+(\.+)(\w*)", text, re.M):
        dots, name = len(m.group(1)), m.group(2)
        if depth_up and dots == 2 or not depth_up and dots == 1:
            yield name
    for m in re.finditer(r"^\s*(?:from|import)\s+trilemma_moe\.(\w+)", text, re.M):
        yield m.group(1)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    own = _package_of(path)
    if own not in LAYERS:
        return
    allowed = set(LAYERS[:LAYERS.index(own) + 1])
    upward = sorted({p for p in _imported_packages(path) if p in LAYERS and p not in allowed})
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports {upward}"


def training_import_graph(directory: Path, package: str = "trilemma_moe.training") -> dict:
    """module -> the modules of ``directory`` (``__init__`` for the package itself) it imports, read
    from the source with ``ast``: module-level imports and those inside functions alike."""
    modules = {p.stem for p in directory.glob("*.py")}
    graph = {}
    for path in sorted(directory.glob("*.py")):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                target, names = None, [a.name for a in node.names]
            else:
                continue
            for full in ([target] if target is not None else names):
                if full == package:   # from . import x: the submodule x, or a name from __init__
                    edges |= {n if n in modules else "__init__" for n in names}
                elif full.startswith(package + "."):
                    edges.add(full[len(package) + 1:].split(".")[0])
        graph[path.stem] = edges & modules
    return graph


def find_cycle(graph: dict):
    """One import circle as a list of modules (its first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_training_imports_point_one_way():
    """training/: no import circle, not even through an import inside a function (the loop's lazy
    DeepSpeed backend); input errors below everything, ``main`` above the loop."""
    graph = training_import_graph(PACKAGE / "training")
    assert "deepspeed_backend" in graph["loop"], graph   # the one inside a function is seen
    assert find_cycle(graph) is None, "import circle: " + " -> ".join(find_cycle(graph))
    assert "loop" in graph["job"] and graph["errors"] == set(), graph
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_core_imports_nothing_distributed():
    for path in (PACKAGE / "core").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(torch\.distributed|deepspeed|megatron)", path.read_text(), re.M), path


def test_no_file_is_too_long_to_read():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if str(p.relative_to(PACKAGE)) not in EXEMPT_FROM_SIZE
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _conforms(cls, protocol):
    """Every method the protocol declares exists on ``cls`` and accepts the protocol's parameters."""
    missing = []
    for name, member in vars(protocol).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        impl = getattr(cls, name, None)
        if impl is None:
            missing.append(name)
            continue
        wanted = list(inspect.signature(member).parameters)[1:]
        have = inspect.signature(impl).parameters
        if not all(p in have for p in wanted) and not any(p.kind == p.VAR_POSITIONAL for p in have.values()):
            missing.append(f"{name}{tuple(wanted)}")
    return missing


@pytest.mark.parametrize("cls,protocol", [
    (interfaces.LocalSync, interfaces.ReplicaSync),
    (ExpertParallelComm, interfaces.ReplicaSync),
    (ExpertParallelComm, interfaces.ExpertParallelExchange),
    (TorchParamIO, interfaces.ParamIO),
    (CPUTier, interfaces.OffloadTier),
])
def test_implementations_fit_their_interfaces(cls, protocol):
    assert _conforms(cls, protocol) == []


def test_deepspeed_collaborators_fit_their_interfaces():
    from trilemma_moe.integrations.aio import AioTier
    from trilemma_moe.integrations.deepspeed import DataParallelSync, DeepSpeedParamIO
    assert _conforms(DataParallelSync, interfaces.ReplicaSync) == []
    assert _conforms(DeepSpeedParamIO, interfaces.ParamIO) == []
    assert _conforms(AioTier, interfaces.OffloadTier) == []


def test_megatron_collaborators_fit_their_interfaces():
    # megatron_optim imports no Megatron (importing megatron.core registers torch safe globals
    # process-wide, argparse.Namespace among them, which the checkpoint tests rely on being refused)
    from trilemma_moe.integrations.megatron_optim import MegatronParamIO
    assert _conforms(MegatronParamIO, interfaces.ParamIO) == []
    assert isinstance(MegatronParamIO(), interfaces.ParamIO)


def test_both_slot_views_carry_what_the_fused_path_reads():
    from trilemma_moe.core.experts import ExpertSpec
    slots = ExpertSlots(ExpertSpec(4, 6, "gelu", False, True), 2, 2, 2, seed=0)
    stored = StoredSlots(G=2, K=2, rank=2, spec=slots.spec, residual_bits=16, base=dict(slots.base),
                         fa=dict(slots.fa), fb=dict(slots.fb), bias=dict(slots.bias))
    for view in (slots, stored):
        assert isinstance(view, interfaces.SlotView)
