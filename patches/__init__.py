"""Every monkeypatch KVQ applies to vLLM: one concern per module, each version-guarded.

Each module exposes ``apply(...)`` (idempotent) and ``check()``; ``check()`` verifies that the
vLLM code it wraps still has the shape the patch was written against and raises
``VLLMChangedError`` otherwise (the tests call it, so a vLLM upgrade fails loudly).

Dependencies run one way: this package imports only vLLM and the standard library, never
``vllm_kvq``. A patch that needs KVQ behaviour receives it as a callback of ``apply``, kept in
a module global that its wrapper reads on every call, so applying again swaps the callback
without wrapping twice. ``vllm_kvq.plugin`` builds the callbacks (``Hooks``) and applies.
"""

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import vllm

# The vLLM releases every patch and the backend interface were checked against (README,
# "vLLM versions"): 0.32 runs the whole suite (CPU build); 0.33 (GPU build only) passes every
# check of its Python layer (tests/test_compat.py).
SUPPORTED_VLLM_VERSIONS = ("0.32.", "0.33.")
ALLOW_UNTESTED_ENV = "VLLM_KVQ_ALLOW_UNTESTED_VLLM"
BACKEND_NAME = "KVQ"  # the AttentionBackendEnum member the patches route and resize
_MARK = "_kvq_patched"


class VLLMChangedError(RuntimeError):
    pass


def is_supported_vllm(version: str | None = None) -> bool:
    return (version or vllm.__version__).startswith(SUPPORTED_VLLM_VERSIONS)


def untested_vllm_message(version: str | None = None) -> str:
    tested = " and ".join(v + "x" for v in SUPPORTED_VLLM_VERSIONS)
    return (f"vllm-kvq was tested with vLLM {tested}, but vLLM {version or vllm.__version__} is "
            f"installed; install a tested vLLM, or set {ALLOW_UNTESTED_ENV}=1 to try this one "
            "(every vLLM function KVQ patches is then checked at startup).")


def require_supported_vllm() -> None:
    if not is_supported_vllm():
        raise VLLMChangedError(untested_vllm_message())


def wrap(owner, name: str, make_wrapper: Callable[[Callable], Callable], *,
         static: bool = False) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)`` unless it is already our wrapper.

    The wrapper is marked (so a second call is a no-op, returning False) and keeps the
    original as ``__wrapped__`` (so ``check()`` still sees vLLM's signature). ``static``
    stores it as a staticmethod: the wrapper closes over the original, already bound if it
    was a classmethod, and must not be bound again.
    """
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return False
    wrapper = make_wrapper(original)
    wrapper.__wrapped__ = original
    setattr(wrapper, _MARK, True)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)
    return True


def _parameters(fn) -> list[str]:
    return list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)


def _changed(patch: str, what: str) -> VLLMChangedError:
    file = patch.rsplit(".", 1)[-1]
    return VLLMChangedError(f"{what}; patches/{file}.py must be updated for this vLLM.")


def check_parameters(fn, expected: list[str], patch: str, what: str, *,
                     exact: bool = True) -> None:
    """Raise VLLMChangedError unless vLLM's ``fn`` (unwrapped) takes exactly ``expected``,
    or with ``exact=False`` takes them first (a wrapper passing them positionally and
    forwarding the rest). ``patch`` is the calling module's ``__name__``; ``what`` names
    ``fn`` in the message."""
    params = _parameters(fn)
    if (params if exact else params[:len(expected)]) != expected:
        raise _changed(patch, f"{what} changed its parameters to {params}")


def require_parameters(fn, names: Iterable[str], patch: str, what: str) -> None:
    """Raise VLLMChangedError unless vLLM's ``fn`` (unwrapped) has every parameter in
    ``names``, wherever it is (for a wrapper that binds its arguments by name)."""
    params = _parameters(fn)
    missing = [p for p in names if p not in params]
    if missing:
        raise _changed(patch, f"{what} lost parameters {missing}")


@dataclass(frozen=True)
class Hooks:
    """The KVQ behaviour the patches call, supplied by ``vllm_kvq.plugin``."""

    # (vllm_config, layer_name, head_size) -> bytes per token and KV head of that layer's page
    slot_bytes: Callable[[Any, str, int], int]
    # the request id of every batch row, or None for dummy and profiling batches
    publish_batch: Callable[[list[str] | None], None]
    # requests that finished or were preempted: their window slots are free again
    release_requests: Callable[[Iterable[str]], None]
    # vllm_config -> None, raising on bad KVQ settings; run when the backend is KVQ
    validate: Callable[[Any], None]
    # (vllm_config, kvq_backend=...) -> None: warn about settings nothing will read
    warn_unread: Callable[..., None]
    # message -> None: raise the error a refused KVQ setting raises, with this message
    refuse: Callable[[str], None]
    # vllm_config -> tokens every prefix-cache hit must be a multiple of (None: vLLM's own)
    hit_alignment: Callable[[Any], int | None]


def apply_all(hooks: Hooks) -> None:
    """Check and apply every patch. On a vLLM release that was not tested (and without
    ``VLLM_KVQ_ALLOW_UNTESTED_VLLM=1``) nothing of vLLM is changed but its config check:
    selecting KVQ then stops startup with one sentence, and other backends are untouched."""
    from . import (cpu_backend_selection, per_layer_kv_spec, prefix_hit_alignment,
                   request_identity, startup_validation)

    if not is_supported_vllm() and os.environ.get(ALLOW_UNTESTED_ENV, "") in ("", "0"):
        startup_validation.check()
        startup_validation.apply(lambda _config: hooks.refuse(untested_vllm_message()),
                                 hooks.warn_unread)
        return
    for patch in (cpu_backend_selection, per_layer_kv_spec, prefix_hit_alignment,
                  request_identity, startup_validation):
        patch.check()
    cpu_backend_selection.apply()
    per_layer_kv_spec.apply(hooks.slot_bytes)
    request_identity.apply(hooks.publish_batch, hooks.release_requests)
    prefix_hit_alignment.apply(hooks.hit_alignment)
    startup_validation.apply(hooks.validate, hooks.warn_unread)
