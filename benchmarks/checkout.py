"""Import the project's kernels from this checkout, installed or not.

The tools here (compile report, GPU check) run on machines with only torch and triton: the
repository root goes first on ``sys.path`` and the kernels are the top-level package
``kernels`` (they import only ``vllm_kvq.formats``, found in the same root), so the kernels
and formats a tool uses are always this checkout's, never an older install's.
"""

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


def kernel_module(name: str = "") -> ModuleType:
    """``kernels.<name>`` (e.g. ``api``) of this checkout."""
    return importlib.import_module("kernels" + (f".{name}" if name else ""))
