"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` decorates the kernels (the
decorator picks interpreter or GPU compilation when the module is imported), so it is set
here, at collection, and any kernel module that an earlier test already imported in GPU
mode is reloaded.
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

_KERNEL_MODULES = ("codecs", "context", "merge", "store", "decode", "prefill", "api")


def _ensure_interpreted() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    mod = sys.modules.get("vllm_kvq.kernels.context")
    if mod is not None and not isinstance(mod.paged_context_kernel, InterpretedFunction):
        for name in _KERNEL_MODULES:
            full = f"vllm_kvq.kernels.{name}"
            if full in sys.modules:
                importlib.reload(sys.modules[full])


_ensure_interpreted()


@pytest.fixture
def seed(request):
    """A fresh seed per test (inputs differ every run); printed on failure to reproduce."""
    import random

    import torch

    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
