"""The house rules, checked on the source: floors that import only downwards, no import circle, no file over 400
lines, the math without Lightning, and the old import paths still working (with a deprecation warning)."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_compress"

#: The floors, bottom up: a module may import its own floor and the ones below (README, "Architecture").
FLOORS = ["_compat", "utils", "graph", "demo", "quantization", "export", "measure", "pruning", "distillation",
          "loading", "report", "references", "testing", "cli_errors", "cli", "__init__"]

#: Pure math and model analysis: no Lightning import.
NO_LIGHTNING = ["graph", "distillation/losses", "quantization/functional.py", "quantization/amax.py",
                "quantization/calibrators.py", "quantization/quantizers.py", "quantization/nonlinear.py",
                "quantization/packed.py", "quantization/ptq.py", "quantization/uncalled.py",
                "pruning/criteria.py", "pruning/structured.py",
                "pruning/masks.py", "pruning/schedules.py", "pruning/groups.py", "pruning/dynamic.py",
                "pruning/head_select.py", "pruning/dynamic_ops.py", "pruning/flows.py", "pruning/optimizer_state.py",
                "distillation/checks.py",
                "distillation/taps.py", "distillation/terms.py", "distillation/students.py",
                "distillation/methods/deep_inversion.py", "export/int8.py", "export/int8_graph.py",
                "export/engines.py", "export/verify.py", "export/counting.py", "export/int8_weight.py",
                "quantization/qat_ranges.py",
                "distillation/transformer.py", "utils/outputs.py", "pruning/transformer_layers.py",
                "export/int8_dynamic.py", "quantization/uncalled.py",
                "export/onnx.py", "export/qdq.py", "export/onnx_graph.py"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Every ``lightning_compress`` module ``path`` imports, at any depth (lazy imports in functions too), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and "TYPE_CHECKING" in ast.unparse(branch.test) for node in ast.walk(branch)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" for alias in node.names)
            targets.add(base)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t.startswith("lightning_compress")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t in _imports(path, name) if t in modules and t != name} for name, path in modules.items()
            if not name.endswith("._compat")}


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_floor_imports_only_itself_and_the_floors_below():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if FLOORS.index(_floor(target)) > FLOORS.index(_floor(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package __init__ re-exporting its own submodules is not a circle of dependencies
    real = [c for c in cycles if not all(m.startswith(c[0]) or c[0].startswith(m) for m in c)]
    assert not real, real


def test_no_file_over_400_lines():
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {path: count for path, count in lines.items() if count > 400}
    assert not long, long


def test_the_math_imports_no_lightning():
    offenders = []
    for entry in NO_LIGHTNING:
        paths = sorted((PACKAGE / entry).rglob("*.py")) if (PACKAGE / entry).is_dir() else [PACKAGE / entry]
        assert paths and all(p.is_file() for p in paths), entry
        for path in paths:
            tree = ast.parse(path.read_text())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            if any(name.split(".")[0] in ("lightning", "pytorch_lightning") for name in imported):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders


@pytest.mark.parametrize(("old", "new"), [
    ("lightning_compress.pruning.tracing", "lightning_compress.graph.tracing"),
    ("lightning_compress.pruning.dependency", "lightning_compress.graph.dependency"),
    ("lightning_compress.utils.layers", "lightning_compress.graph.layers"),
    ("lightning_compress.quantization.calibration", "lightning_compress.quantization.calibrators"),
    ("lightning_compress.quantization.calibrate", "lightning_compress.quantization.ptq"),
    ("lightning_compress.quantization.callbacks", "lightning_compress.quantization.qat_callback"),
    ("lightning_compress.quantization.export", "lightning_compress.export.int8"),
    ("lightning_compress.quantization.export_callback", "lightning_compress.export.int8_callback"),
    ("lightning_compress.distillation.losses_response", "lightning_compress.distillation.losses.response"),
    ("lightning_compress.distillation.mutual", "lightning_compress.distillation.methods.mutual"),
    ("lightning_compress.distillation.features", "lightning_compress.distillation.taps"),
])
def test_an_old_module_path_is_the_new_module_with_a_deprecation_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported by an earlier test: import it afresh
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        moved = importlib.import_module(old)
    assert moved is importlib.import_module(new)


def test_from_imports_of_old_paths_and_names_keep_working(monkeypatch):
    monkeypatch.delitem(sys.modules, "lightning_compress.quantization.calibration", raising=False)
    with pytest.warns(DeprecationWarning):
        from lightning_compress.quantization.calibration import compute_amax as old_compute_amax
    from lightning_compress.quantization import compute_amax
    assert old_compute_amax is compute_amax
    with pytest.warns(DeprecationWarning, match="lightning_compress.utils.select_layers moved"):
        from lightning_compress.utils import select_layers as old_select_layers
    from lightning_compress.graph import select_layers
    assert old_select_layers is select_layers
    with warnings.catch_warnings():  # the documented public names: no warning
        warnings.simplefilter("error")
        from lightning_compress.export import export_int8
        from lightning_compress.pruning import compact
        from lightning_compress.quantization import export_int8 as public_export_int8
    assert public_export_int8 is export_int8 and callable(compact)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        importlib.import_module("lightning_compress.quantization").nothing_here  # noqa: B018
