"""The package floors: every import inside haq points at a lower floor (or stays in its own package),
so no arrow runs back up. Function-level imports count too."""
from __future__ import annotations

import ast
from pathlib import Path

import haq

FLOORS: dict[str, int] = {
    "haq": 0, "haq.errors": 0, "haq.io": 0.5, "haq.paths": 0.5, "haq.tensorfile": 0.5,
    "haq.models": 1, "haq.kernels": 1, "haq.data": 1,
    "haq.quant": 2, "haq.runtime": 2, "haq.eval": 2, "haq.zoo": 2,
    "haq.checkpoint": 3,
    "haq.sim": 4,
    "haq.loading": 5,
    "haq.api": 6,
    "haq.serve": 7,
    "haq.cli": 8, "haq.demo": 8,
}
ROOT = Path(haq.__file__).parent


def _unit(module: str) -> str:
    """The floor unit a dotted module belongs to: its longest prefix in FLOORS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return ".".join(parts[:n])
    raise KeyError(module)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


def _haq_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n == "haq" or n.startswith("haq.")]


def test_every_module_has_a_floor():
    unplaced = [name for name in _modules() if name != "haq" and _unit(name) == "haq"]
    assert unplaced == [], "add these to FLOORS"


def test_no_import_runs_back_up():
    upward = []
    for name, path in _modules().items():
        unit = _unit(name)
        for target in _haq_imports(path):
            other = _unit(target)
            if other != unit and FLOORS[other] >= FLOORS[unit]:
                upward.append(f"{name} imports {target} (floor {FLOORS[other]} >= {FLOORS[unit]})")
    assert upward == []


def test_files_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_the_routed_expert_loop_is_written_once():
    """unique -> where -> index_add_ lives in haq.kernels.moe; everything else plugs into it."""
    writers = sorted(name for name, path in _modules().items() if "index_add_" in path.read_text())
    assert writers == ["haq.kernels.moe"]
