"""Validate KVQ settings while vLLM validates its config, before anything is allocated.

Wraps the current platform's ``check_and_update_config(vllm_config)`` classmethod, which
``VllmConfig.__post_init__`` calls in the process that builds the config (the CLI or
``LLM(...)``), so a bad setting stops startup with one sentence before the engine starts.
"""

import inspect

from . import VLLMChangedError

_MARK = "_kvq_patched"


def _target():
    from vllm.platforms import current_platform

    return type(current_platform)


def check() -> None:
    fn = _target().check_and_update_config
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    if params != ["vllm_config"]:
        raise VLLMChangedError(f"Platform.check_and_update_config changed its parameters to "
                               f"{params}; patches/startup_validation.py must be updated.")


def apply() -> None:
    cls = _target()
    original = cls.check_and_update_config
    if getattr(original, _MARK, False):
        return

    def check_and_update_config(vllm_config) -> None:
        original(vllm_config)
        from vllm_kvq import validation

        backend = getattr(vllm_config.attention_config, "backend", None)
        if backend is not None and backend.name == "KVQ":
            validation.validate_vllm_config(vllm_config)
        else:
            validation.warn_unread_settings(vllm_config, kvq_backend=False)

    check_and_update_config.__wrapped__ = original
    setattr(check_and_update_config, _MARK, True)
    cls.check_and_update_config = staticmethod(check_and_update_config)
