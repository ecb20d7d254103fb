"""Architecture rules: cfsctl speaks only varlink; cfsd layers depend downward only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# A package may import only from the layers listed for it (storage core at the bottom).
ALLOWED = {
    "cfsd.core": {"cfsd.core"},
    "cfsd.oci": {"cfsd.core", "cfsd.oci"},
    "cfsd.delta": {"cfsd.core", "cfsd.oci", "cfsd.delta"},
    "cfsd.service": {"cfsd", "cfsd.core", "cfsd.oci", "cfsd.delta", "cfsd.service"},
}


def imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods.add(node.module)
    return mods


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cfsd":
        return None
    return ".".join(parts[:2]) if len(parts) > 1 and f"cfsd.{parts[1]}" in ALLOWED else "cfsd"


def test_cfsctl_imports_nothing_from_cfsd() -> None:
    files = list((ROOT / "cfsctl").rglob("*.py"))
    assert files
    for f in files:
        bad = {m for m in imports(f) if m == "cfsd" or m.startswith("cfsd.")}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_depend_downward(layer: str) -> None:
    pkg = ROOT / layer.replace(".", "/")
    for f in pkg.rglob("*.py"):
        for m in imports(f):
            target = layer_of(m)
            if target is None:
                continue
            assert target in ALLOWED[layer], f"{f.relative_to(ROOT)} imports {m}"


MAX_LINES = 800


def test_no_module_over_800_lines() -> None:
    files = [*(ROOT / "cfsd").rglob("*.py"), *(ROOT / "cfsctl").rglob("*.py")]
    assert files
    over = {str(f.relative_to(ROOT)): n for f in files
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
