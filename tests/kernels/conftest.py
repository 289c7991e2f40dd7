"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` decorates anything (the decorator
picks interpreter or GPU compilation when a module is imported), so it is set here, at
collection; if triton was already imported in GPU mode, collection fails with instructions.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _ensure_interpreted() -> None:
    """If triton was imported before TRITON_INTERPRET=1 was set (e.g. by another test
    directory importing vLLM at collection), its own @jit library functions (tl.zeros, tl.sum,
    ...) are GPU-mode JITFunctions the interpreter cannot call, and triton cannot be imported
    a second time in one process. Fail loudly instead of with obscure errors."""
    triton = sys.modules.get("triton")
    if triton is None:
        return
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(standard.zeros, InterpretedFunction):
        raise RuntimeError(
            "tests/kernels must run with TRITON_INTERPRET=1 set before triton is imported, but "
            "triton was already imported in GPU mode; run `TRITON_INTERPRET=1 pytest ...`, run "
            "tests/kernels in its own pytest process, or set "
            "os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py.")


_ensure_interpreted()
