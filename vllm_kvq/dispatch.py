"""Which implementation of the attention ops runs: compiled kernels or the torch reference.

``VLLM_KVQ_KERNELS`` = ``auto`` (default: the Triton kernels on CUDA, the compiled CPU kernels
on CPU), ``triton`` (force the Triton kernels; on CPU this needs ``TRITON_INTERPRET=1``, which
runs them in Triton's interpreter -- slow, for tests on tiny models), ``cpu`` (force the
compiled CPU kernels, ``vllm_kvq.cpu_kernel``) or ``torch`` (the reference,
``vllm_kvq.paged_attention``). Every implementation exposes ``store_slots``,
``decode_attention`` and ``prefill_attention_varlen`` with the same signatures. The ``VLLM_``
prefix makes vLLM copy the variable to Ray workers.

The Triton kernels are not imported from here: they register themselves (``register_kernels``),
found through the ``vllm_kvq.kernels`` entry-point group of the installed package (without
an install there is nothing to find: every layer runs the torch path, and a plain
checkout's tools call the kernels directly, not through this dispatch). Each implementation
says for itself which layer formats it reads (its ``gap``); a layer it cannot run (e.g. head
size 80 or 96 on Triton, KIVI or QJL keys on the CPU kernels, a format without kernel pieces,
a CPU without a compiler) uses the torch path under ``auto`` and is refused at startup when
the implementation is forced, so the choice is always made before any memory is allocated.
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
CHOICES = ("auto", "triton", "cpu", "torch")
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


def compiled_choice(device_type: str) -> str | None:
    """The compiled implementation layers on this device try first: "triton", "cpu", or
    None (the torch path)."""
    choice = kernel_choice()
    if choice == "auto":
        return {"cuda": "triton", "cpu": "cpu"}.get(device_type)
    return None if choice == "torch" else choice


def kernel_gap(fmt: LayerFormat, head_size: int, dtype) -> str | None:
    """Why the Triton kernels cannot run this layer format, or None if they can."""
    kernels = registered_kernels()
    if kernels is None:
        return "the Triton kernels are not installed (vllm_kvq.kernels)"
    return kernels.gap(fmt, head_size, dtype)


def cpu_kernel_gap(fmt: LayerFormat, head_size: int, dtype) -> str | None:
    """Why the compiled CPU kernels cannot run this layer format (building them on first
    use), or None if they can."""
    from .cpu_kernel import ops

    return ops.gap(fmt, head_size, dtype)


def layer_gap(device_type: str, fmt: LayerFormat, head_size: int, dtype) -> str | None:
    """Why this device's compiled implementation cannot run the layer (None: it can, or the
    torch path was chosen)."""
    impl = compiled_choice(device_type)
    if impl is None:
        return None
    return (kernel_gap if impl == "triton" else cpu_kernel_gap)(fmt, head_size, dtype)


def check_kernel_choice(device_type: str, formats: list[LayerFormat | tuple[LayerFormat, ...]],
                        head_size: int, dtype) -> list[int]:
    """Startup check, ``formats``: each layer's format (or the formats its KV heads store).
    Returns the layers where some format falls back to the torch path under ``auto``;
    raises if the choice cannot run (forced Triton without the interpreter on CPU, forced CPU
    kernels on another device, or a forced implementation for a layer format it does not
    cover)."""
    choice = kernel_choice()
    if choice == "triton" and device_type != "cuda" and \
            os.environ.get("TRITON_INTERPRET") != "1":
        raise KVQConfigError(f"{ENV}=triton on a {device_type} device needs TRITON_INTERPRET=1 "
                             "(Triton's interpreter); allowed values there are auto, cpu and "
                             "torch.")
    if choice == "cpu" and device_type != "cpu":
        raise KVQConfigError(f"{ENV}=cpu runs the CPU kernels, but the device is "
                             f"{device_type}; allowed values there are auto, triton and torch.")
    if compiled_choice(device_type) is None:
        return []
    fallbacks = []
    for layer, fmts in enumerate(formats):
        gaps = [layer_gap(device_type, f, head_size, dtype)
                for f in (fmts if isinstance(fmts, tuple) else (fmts,))]
        gap = next((g for g in gaps if g is not None), None)
        if gap is not None and choice != "auto":
            raise KVQConfigError(f"{ENV}={choice} cannot run layer {layer} ({gap}); allowed "
                                 "values for this model are auto and torch.")
        if gap is not None:
            fallbacks.append(layer)
    return fallbacks


def prefill_planner(device_type: str) -> Callable | None:
    """The Triton kernels' once-per-step prefill plan (``plan_prefill_step(query_start_loc,
    context_lens, device)``: device query starts, context lengths and tile maps, which every
    layer's launches then reuse) when this device's layers run them, else None."""
    if compiled_choice(device_type) != "triton":
        return None
    kernels = registered_kernels()
    return None if kernels is None else kernels.ops.plan_prefill_step


def attention_ops(device_type: str, fmt: LayerFormat, head_size: int, dtype) -> ModuleType:
    """The ops module of one layer (all read the exact window and sliding windows the same
    way)."""
    impl = compiled_choice(device_type)
    if impl is None or layer_gap(device_type, fmt, head_size, dtype) is not None:
        return paged_attention
    if impl == "triton":
        return registered_kernels().ops
    from .cpu_kernel import ops

    return ops
