"""The CPU platform ignores ``--attention-backend`` and always returns CPU_ATTN; route KVQ.

vLLM 0.32: ``CpuPlatform.get_attn_backend_cls(selected_backend, attn_selector_config,
num_heads=None)`` (vllm/platforms/cpu.py).
"""

import inspect

from . import VLLMChangedError

_MARK = "_kvq_patched"


def _target():
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


def check() -> None:
    fn = _target().get_attn_backend_cls
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    if params[:2] != ["selected_backend", "attn_selector_config"]:
        raise VLLMChangedError(
            f"CpuPlatform.get_attn_backend_cls changed its parameters to {params}; "
            "patches/cpu_backend_selection.py must be updated for this vLLM.")


def apply() -> None:
    cls = _target()
    original = cls.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return

    def get_attn_backend_cls(selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is not None and selected_backend.name == "KVQ":
            return selected_backend.get_path()
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls.__wrapped__ = original
    setattr(get_attn_backend_cls, _MARK, True)
    cls.get_attn_backend_cls = staticmethod(get_attn_backend_cls)
