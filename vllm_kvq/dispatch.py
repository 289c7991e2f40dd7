"""Which implementation of the attention ops runs: Triton kernels or the torch reference.

``VLLM_KVQ_KERNELS`` = ``auto`` (default: Triton on CUDA, torch on CPU), ``triton`` (force
the kernels; on CPU this needs ``TRITON_INTERPRET=1``, which runs them in Triton's
interpreter -- slow, for tests on tiny models) or ``torch``. Both implementations expose
``store_slots``, ``decode_attention`` and ``prefill_attention_varlen`` with the same
signatures. The ``VLLM_`` prefix makes vLLM copy the variable to Ray workers.
"""

import os

from .config import KVQConfigError

ENV = "VLLM_KVQ_KERNELS"
CHOICES = ("auto", "triton", "torch")


def kernel_choice() -> str:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise KVQConfigError(f"{ENV}={choice!r} is invalid; allowed values are "
                             f"{', '.join(CHOICES)}.")
    return choice


def check_kernel_choice(device_type: str) -> None:
    """Startup check: forcing Triton on CPU without the interpreter cannot run."""
    if kernel_choice() == "triton" and device_type != "cuda" and \
            os.environ.get("TRITON_INTERPRET") != "1":
        raise KVQConfigError(f"{ENV}=triton on a {device_type} device needs TRITON_INTERPRET=1 "
                             "(Triton's interpreter); allowed values there are auto and torch.")


def attention_ops(device_type: str):
    choice = kernel_choice()
    if choice == "triton" or (choice == "auto" and device_type == "cuda"):
        from vllm_kvq.kernels import api

        return api
    from vllm_kvq import paged_attention

    return paged_attention
