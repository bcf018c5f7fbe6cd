"""Imports run one way (DESIGN.md): cli → serve / eval / bench → training → methods → engine →
ops. A module imports its own layer or one below, never above — function-level (lazy) imports
included, since a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "safedecode"
# Lowest first. Shared by every layer: the anchor data, the judges, the CLI error helper, the
# Triton kernels, loading models (and the one model fingerprint).
LAYERS: dict[str, int] = {
    "ops": 0, "triton_kernels": 0, "data": 0, "judges": 0, "cli_errors": 0, "models": 0,
    "engine": 1,
    "methods": 2,
    "training": 3,
    "serve": 4, "eval": 4, "bench": 4, "hf_generate": 4,
    "cli": 5, "check": 5, "info": 5, "demo": 5, "__main__": 5,
}


# The exceptions, each with its reason.
ALLOWED = {
    # load_model(adapter=...) merges a LoRA through the engine's one reader of peft folders
    ("safedecode.models", "safedecode.engine.adapters"),
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "safedecode" or len(parts) < 2:
        return None  # the package itself (its lazy facade) or not ours
    return LAYERS.get(parts[1])


def _module(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every module ``path`` imports (relative imports resolved), with lines."""
    mod = _module(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mine = _layer(_module(path, root))
        if mine is None:
            continue
        for name, line in _imports(path, root):
            theirs = _layer(name)
            if theirs is not None and theirs > mine \
                    and (_module(path, root), name) not in ALLOWED:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {name}")
    return bad


def test_every_top_level_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py")
             or (p.is_dir() and (p / "__init__.py").is_file())}
    assert parts - set(LAYERS) == set(), "give the new module a layer in LAYERS"


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "safedecode"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "methods").mkdir()
    for d in (pkg, pkg / "engine", pkg / "methods"):
        (d / "__init__.py").write_text("")
    (pkg / "methods" / "m.py").write_text("from ..engine import x\n")  # down: fine
    (pkg / "engine" / "e.py").write_text(
        "def f():\n    from ..methods import m\n    import safedecode.training.opo\n")
    got = violations(pkg)
    assert got == ["safedecode/engine/e.py:2 imports safedecode.methods",
                   "safedecode/engine/e.py:3 imports safedecode.training.opo"]

