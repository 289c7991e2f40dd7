"""Which implementation of the attention ops runs: Triton kernels or the torch reference.

``VLLM_KVQ_KERNELS`` = ``auto`` (default: Triton on CUDA, torch on CPU), ``triton`` (force
the kernels; on CPU this needs ``TRITON_INTERPRET=1``, which runs them in Triton's
interpreter -- slow, for tests on tiny models) or ``torch``. Both implementations expose
``store_slots``, ``decode_attention`` and ``prefill_attention_varlen`` with the same
signatures. The ``VLLM_`` prefix makes vLLM copy the variable to Ray workers.

The kernels cover power-of-two head sizes and every shipped format, with or without the exact
recent window (both read it from the layer's ring; see ``kernels.merge``), KIVI keys included
(groups of 16, 32 or 64 tokens; their groups are packed in torch, ``group_packing``, on either
path); a layer they cannot run (e.g. head size 80 or 96, or KIVI groups of 8 or 128 tokens)
uses the torch path under ``auto`` and is refused at startup under ``triton``, so the choice
is always made before any memory is allocated.
"""

import os

from .config import KVQConfigError
from .formats import LayerFormat

ENV = "VLLM_KVQ_KERNELS"
CHOICES = ("auto", "triton", "torch")


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
    from vllm_kvq.kernels.layout import make_layout

    try:
        make_layout(fmt.key, fmt.value, head_size, dtype)
    except ValueError as e:
        return str(e)
    return None


def check_kernel_choice(device_type: str, formats: list[LayerFormat], head_size: int,
                        dtype, window: int = 0) -> list[int]:
    """Startup check. Returns the layers that fall back to the torch path under ``auto``;
    raises if the choice cannot run (forced Triton without the interpreter on CPU, or forced
    Triton for a layer format the kernels do not cover). ``window`` (the exact recent window)
    does not change the answer: the kernels read it wherever they run."""
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


def attention_ops(device_type: str, fmt: LayerFormat, head_size: int, dtype, window: int = 0):
    """The ops module of one layer. Both take the window as ``ring=``, ``window_slots=``,
    ``window_exact=`` keywords, so ``window`` does not change the choice (kept for callers)."""
    if wants_kernels(device_type) and kernel_gap(fmt, head_size, dtype) is None:
        from vllm_kvq.kernels import api

        return api
    from vllm_kvq import paged_attention

    return paged_attention
