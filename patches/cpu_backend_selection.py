"""The CPU platform ignores ``--attention-backend`` and always returns CPU_ATTN; route KVQ.

vLLM 0.32: ``CpuPlatform.get_attn_backend_cls(selected_backend, attn_selector_config,
num_heads=None)`` (vllm/platforms/cpu.py), a classmethod; the wrapper answers KVQ's class
path itself and hands every other backend to vLLM's.
"""

from . import BACKEND_NAME, check_parameters, wrap


def _target():
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


def check() -> None:
    # The wrapper passes these two positionally and forwards the rest.
    check_parameters(_target().get_attn_backend_cls, ["selected_backend", "attn_selector_config"],
                     __name__, "CpuPlatform.get_attn_backend_cls", exact=False)


def apply() -> None:
    wrap(_target(), "get_attn_backend_cls", _route_kvq, static=True)


def _route_kvq(original):
    def get_attn_backend_cls(selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            return selected_backend.get_path()
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    return get_attn_backend_cls
