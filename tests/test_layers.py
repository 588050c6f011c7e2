"""The package's shape: layers import only downwards, and no source file is over 500 lines.

Every module of `vlmalign/` is read with `ast` (imports inside functions included, so a lazy import counts as
much as a top-level one) and each import of another vlmalign package is checked against the layer order written
in README.md's architecture section:

    losses, rewards, compat  <  models  <  data  <  rl  <  eval  <  trainers  <  recipes  <  cli

The bottom three import no other vlmalign package (not even each other). A module may import anything in its own
package and anything in a lower layer; `vlmalign/__init__.py` re-exports lazily from every layer and is not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmalign"

# package (first name under vlmalign) -> layer; equal layers in different packages may not import each other
LAYERS = {
    "losses": 0, "rewards": 0, "compat": 0,
    "models": 1,
    "data": 2,
    "rl": 3,
    "eval": 4,
    "trainers": 5,
    "recipes": 6, "scripts_utils": 6,
    "cli": 7,
}
MAX_LINES = 500


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def vlmalign_imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(imported vlmalign module, line) for every import in the file, at any depth (relative ones resolved)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == "vlmalign":  # `from . import x` / `from vlmalign import x`
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((target, node.lineno))
    return [(target, line) for target, line in found if target == "vlmalign" or target.startswith("vlmalign.")]


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert packages == set(LAYERS), "give each vlmalign package a layer here and in README.md's architecture section"


def test_imports_only_go_down():
    upward = []
    for path in sources("vlmalign"):
        here = package_of(module_name(path))
        if here is None:  # vlmalign/__init__.py: lazy re-exports of the public names
            continue
        for target, line in vlmalign_imports(path):
            there = package_of(target)
            if there is None or there == here:
                continue
            if there not in LAYERS or LAYERS[there] >= LAYERS[here]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({here}, layer {LAYERS[here]}) imports {target} "
                              f"({there}, layer {LAYERS.get(there)})")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself: a function-level relative import is found and resolved.
    (tmp_path / "vlmalign" / "data").mkdir(parents=True)
    probe = tmp_path / "vlmalign" / "data" / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from ..rl.rollout import generate\n    from . import collate\n"
                     "    import vlmalign.eval\n    from .formats import normalize_row\n")
    assert vlmalign_imports(probe, tmp_path) == [
        ("vlmalign.rl.rollout", 4), ("vlmalign.data.collate", 5), ("vlmalign.eval", 6), ("vlmalign.data.formats", 7)]


@pytest.mark.parametrize("folder", ["vlmalign", "benchmarks"])
def test_no_source_file_over_500_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sources(folder)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"
