"""Which implementation of the attention ops runs: Triton kernels or the torch reference.

``VLLM_KVQ_KERNELS`` = ``auto`` (default: Triton on CUDA, torch on CPU), ``triton`` (force
the kernels; on CPU this needs ``TRITON_INTERPRET=1``, which runs them in Triton's
interpreter -- slow, for tests on tiny models) or ``torch``. Both implementations expose
``store_slots``, ``decode_attention`` and ``prefill_attention_varlen`` with the same
signatures. The ``VLLM_`` prefix makes vLLM copy the variable to Ray workers.

The kernels are not imported from here: they register themselves (``register_kernels``),
found through the ``vllm_kvq.kernels`` entry-point group of the installed package (without
an install there is nothing to find: every layer runs the torch path, and a plain
checkout's tools call the kernels directly, not through this dispatch). They say for
themselves which layer formats they read (``gap``); a layer they cannot run (e.g.
head size 80 or 96, KIVI groups of 8 or 128 tokens, a format without kernel pieces) uses the
torch path under ``auto`` and is refused at startup under ``triton``, so the choice is always
made before any memory is allocated.
"""

import importlib.metadata
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from . import paged_attention
from .config import KVQConfigError
from .formats import LayerFormat

ENV = "VLLM_KVQ_KERNELS"
CHOICES = ("auto", "triton", "torch")
ENTRY_POINT_GROUP = "vllm_kvq.kernels"


@dataclass(frozen=True)
class Kernels:
    """A kernel implementation of the attention ops: the ops module, and why it cannot run a
    layer format (``gap(fmt, head_size, dtype)`` -> one phrase, or None)."""

    ops: ModuleType
    gap: Callable[[LayerFormat, int, object], str | None]


_registered: list[Kernels] = []
_discovered = False


def register_kernels(kernels: Kernels) -> None:
    """Called by a kernel package when it is imported (the latest registration wins)."""
    _registered.append(kernels)


def registered_kernels() -> Kernels | None:
    global _discovered
    if not _registered and not _discovered:
        _discovered = True
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry.load()()
    return _registered[-1] if _registered else None


def kernel_choice() -> str:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise KVQConfigError(f"{ENV}={choice!r} is invalid; allowed values are "
                             f"{', '.join(CHOICES)}.")
    return choice


def wants_kernels(device_type: str) -> bool:
    choice = kernel_choice()
    return choice == "triton" or (choice == "auto" and device_type == "cuda")


def kernel_gap(fmt: LayerFormat, head_size: int, dtype) -> str | None:
    """Why the Triton kernels cannot run this layer format, or None if they can."""
    kernels = registered_kernels()
    if kernels is None:
        return "the Triton kernels are not installed (vllm_kvq.kernels)"
    return kernels.gap(fmt, head_size, dtype)


def check_kernel_choice(device_type: str, formats: list[LayerFormat], head_size: int,
                        dtype) -> list[int]:
    """Startup check. Returns the layers that fall back to the torch path under ``auto``;
    raises if the choice cannot run (forced Triton without the interpreter on CPU, or forced
    Triton for a layer format the kernels do not cover)."""
    choice = kernel_choice()
    if choice == "triton" and device_type != "cuda" and \
            os.environ.get("TRITON_INTERPRET") != "1":
        raise KVQConfigError(f"{ENV}=triton on a {device_type} device needs TRITON_INTERPRET=1 "
                             "(Triton's interpreter); allowed values there are auto and torch.")
    if not wants_kernels(device_type):
        return []
    fallbacks = []
    for layer, fmt in enumerate(formats):
        gap = kernel_gap(fmt, head_size, dtype)
        if gap is not None and choice == "triton":
            raise KVQConfigError(f"{ENV}=triton cannot run layer {layer} ({gap}); allowed "
                                 "values for this model are auto and torch.")
        if gap is not None:
            fallbacks.append(layer)
    return fallbacks


def attention_ops(device_type: str, fmt: LayerFormat, head_size: int, dtype) -> ModuleType:
    """The ops module of one layer (both read the exact window the same way)."""
    if wants_kernels(device_type) and kernel_gap(fmt, head_size, dtype) is None:
        return registered_kernels().ops
    return paged_attention
