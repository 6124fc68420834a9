"""The rules of the house (docs/ARCHITECTURE.md): layered imports without cycles, small files, no private
cross-imports. Known offenders owned by open issues are listed explicitly; the lists can only shrink."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ovd"
CONTRACT = ROOT / ".importlinter"
MAX_LINES = 500

# Files over MAX_LINES today, each split by an open issue.
BIG_FILES_ALLOWED: set[str] = set()
# (importing module, imported module, private name) today, each removed by an open issue.
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str, str]] = set()


def _lint_imports(config: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold() -> None:
    result = _lint_imports(CONTRACT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_import_contract_can_fail(tmp_path: Path) -> None:
    # utils imports errors: with errors put above utils the layers contract must break
    layers = "    ovd.utils\n    ovd.errors | ovd.structures\n"
    swapped = CONTRACT.read_text().replace(layers, "    ovd.errors\n    ovd.utils\n")
    assert swapped != CONTRACT.read_text()
    (tmp_path / "contract.ini").write_text(swapped)
    result = _lint_imports(tmp_path / "contract.ini")
    assert result.returncode != 0 and "ovd.utils" in result.stdout


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _private_imports(modules: dict[str, Path]) -> set[tuple[str, str, str]]:
    found = set()
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and base in modules and base != mod:
                    found.add((mod, base, alias.name))
    return found


def _check_allow_list(found: set, allowed: set, what: str) -> None:
    assert found <= allowed, f"new {what}: {sorted(found - allowed)}"
    if allowed - found:
        warnings.warn(f"fixed {what}, remove from the allow-list: {sorted(allowed - found)}", stacklevel=2)


def test_no_big_files_and_no_private_cross_imports() -> None:
    modules = _modules()
    big = {str(p.relative_to(ROOT)) for p in modules.values() if p.read_text().count("\n") > MAX_LINES}
    _check_allow_list(big, BIG_FILES_ALLOWED, f"files over {MAX_LINES} lines")
    _check_allow_list(_private_imports(modules), PRIVATE_IMPORTS_ALLOWED, "imports of private names")


def test_private_import_check_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "ovd"
    pkg.mkdir()
    (pkg / "a.py").write_text("_x = 1\n")
    (pkg / "b.py").write_text("from ovd.a import _x\nfrom .a import _x as y\n")
    modules = {"ovd.a": pkg / "a.py", "ovd.b": pkg / "b.py"}
    assert _private_imports(modules) == {("ovd.b", "ovd.a", "_x")}


def _layered_modules(contract: str) -> set[str]:
    """The modules named in the layers contract's ``layers =`` block."""
    block = contract.split("layers =", 1)[1].split("\n\n", 1)[0].split("unmatched_ignore_imports_alerting")[0]
    return {name.strip("() ") for line in block.splitlines() for name in re.split(r"[:|]", line) if name.strip()}


def test_every_top_level_module_has_a_floor() -> None:
    # a module missing from the layers contract would escape the import rules unnoticed
    top = {f"ovd.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    top |= {f"ovd.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    layered = _layered_modules(CONTRACT.read_text())
    assert top - layered == set(), f"add these to .importlinter's layers: {sorted(top - layered)}"
    assert "ovd.runtime" in layered and "ovd.prepare" in layered  # the parser reads the real block


BLOCK_LINES = 6  # a run of this many identical code lines in two places of ovd/ is a repeated block


def _code_lines(source: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count: not blank, not comments, not imports."""
    skip: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#") and number not in skip:
            out.append((number, text))
    return out


def _repeated_blocks(files: dict[str, str]) -> list[list[tuple[str, int]]]:
    seen: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    for name, source in files.items():
        lines = _code_lines(source)
        for k in range(len(lines) - BLOCK_LINES + 1):
            block = tuple(text for _, text in lines[k : k + BLOCK_LINES])
            seen.setdefault(block, []).append((name, lines[k][0]))
    return [places for places in seen.values() if len(places) > 1]


def test_no_repeated_blocks() -> None:
    files = {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    repeated = _repeated_blocks(files)
    assert not repeated, f"{BLOCK_LINES}-line blocks written twice (file, first line): {repeated[:5]}"


def test_repeated_block_check_can_fail() -> None:
    body = "".join(f"    x{i} = f({i})\n" for i in range(BLOCK_LINES))
    files = {"a.py": f"import os\nimport sys\n\ndef a():\n{body}", "b.py": f"import os\nimport sys\n\ndef b():\n{body}"}
    assert _repeated_blocks(files) == [[("a.py", 5), ("b.py", 5)]]
    files["b.py"] = files["b.py"].replace("f(3)", "g(3)")  # one line differs: no longer a repeat
    assert _repeated_blocks(files) == []
