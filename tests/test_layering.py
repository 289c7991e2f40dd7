"""The folders depend on each other one way, and the kernels import from a bare checkout.

vllm_kvq/ never imports the kernels (they register with ``vllm_kvq.dispatch`` through an
entry point); kernels/ imports only ``vllm_kvq.formats`` and ``vllm_kvq.dispatch`` of the
plugin (torch-only modules); patches/ imports nothing of vllm_kvq (checked in
test_patches.py). A bare checkout -- no installed package, no vLLM -- imports the kernels.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> list[tuple[str, str]]:
    """(file, absolute module name) of every import in the folder's Python files."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((path.name, node.module))
    return found


def test_the_plugin_never_imports_the_kernels():
    offending = [(f, m) for f, m in _imports("vllm_kvq")
                 if m.startswith(("vllm_kvq.kernels", "kernels"))]
    assert not offending, offending


def test_the_kernels_import_only_the_formats_and_the_dispatch_of_the_plugin():
    allowed = ("vllm_kvq.formats", "vllm_kvq.dispatch")
    offending = [(f, m) for f, m in _imports("kernels")
                 if m.startswith("vllm") and not m.startswith(allowed)]
    assert not offending, offending


def test_kernels_import_from_a_bare_checkout():
    """No site hooks (so no editable install), only torch's and triton's folders on the path:
    ``kernels`` and the formats it needs come from the checkout, and vLLM is never loaded."""
    site = str(Path(torch.__file__).parents[1])
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {site!r}]\n"
        "import kernels.api, kernels.launch\n"
        "import vllm_kvq.formats\n"
        f"assert kernels.api.__file__.startswith({str(ROOT)!r}), kernels.api.__file__\n"
        f"assert vllm_kvq.formats.__file__.startswith({str(ROOT)!r})\n"
        "loaded = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
