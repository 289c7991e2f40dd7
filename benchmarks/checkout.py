"""Import the project from a plain checkout as well as from the installed package.

Installed, the kernels are ``vllm_kvq.kernels``; in a bare checkout (say, a GPU machine with
only torch and triton) the repository root goes on ``sys.path`` and they are the top-level
package ``kernels`` (they import only ``vllm_kvq.formats``, found there as well).
"""

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def kernel_module(name: str = "") -> ModuleType:
    """``kernels.<name>`` (e.g. ``api``), installed or from this checkout."""
    suffix = f".{name}" if name else ""
    try:
        return importlib.import_module("vllm_kvq.kernels" + suffix)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("vllm_kvq.kernels"):
            raise
        return importlib.import_module("kernels" + suffix)
