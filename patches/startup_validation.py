"""Validate KVQ settings while vLLM validates its config, before anything is allocated.

Wraps the current platform's ``check_and_update_config(vllm_config)`` classmethod, which
``VllmConfig.__post_init__`` calls in the process that builds the config (the CLI or
``LLM(...)``), so a bad setting stops startup with one sentence before the engine starts.
After vLLM's own check the wrapper calls the ``validate`` callback given to ``apply`` when
the attention backend is KVQ, and ``warn_unread(vllm_config, kvq_backend=False)`` otherwise.
"""

from collections.abc import Callable
from typing import Any

from . import BACKEND_NAME, check_parameters, wrap

# Read by the wrapper on every call, so a later apply() swaps them without wrapping again.
_validate: Callable[[Any], None] | None = None
_warn_unread: Callable[..., None] | None = None


def _target():
    from vllm.platforms import current_platform

    return type(current_platform)


def check() -> None:
    check_parameters(_target().check_and_update_config, ["vllm_config"], __name__,
                     "Platform.check_and_update_config")


def apply(validate: Callable[[Any], None], warn_unread: Callable[..., None]) -> None:
    """``validate(vllm_config)`` raises on bad KVQ settings; ``warn_unread(vllm_config,
    kvq_backend=False)`` warns about KVQ settings given without the KVQ backend."""
    global _validate, _warn_unread
    _validate, _warn_unread = validate, warn_unread
    wrap(_target(), "check_and_update_config", _validating, static=True)


def _validating(original):
    def check_and_update_config(vllm_config) -> None:
        original(vllm_config)
        backend = getattr(vllm_config.attention_config, "backend", None)
        if backend is not None and backend.name == BACKEND_NAME:
            _validate(vllm_config)
        else:
            _warn_unread(vllm_config, kvq_backend=False)

    return check_and_update_config
