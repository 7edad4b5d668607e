"""DESIGN.md rule 1: guest (drivers) and host (devices) never import each other; both use only
the ABI package (and the machine layer). Checked with import-linter's contracts in
pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_kept():
    exe = shutil.which("lint-imports") or shutil.which("lint-imports", path=str(
        Path(sys.executable).parent))
    assert exe, "import-linter is part of the test extra"
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_abi_does_no_io():
    """The ABI package imports nothing that does I/O."""
    import ast
    banned = {"os", "socket", "select", "mmap", "posix_ipc", "subprocess", "threading",
              "msgpack"}
    for path in (ROOT / "vmsim" / "abi").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            for n in names:
                assert n not in banned, f"{path.name} imports {n}"
