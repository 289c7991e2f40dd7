"""Every monkeypatch KVQ applies to vLLM: one concern per module, each version-guarded.

Each module exposes ``apply()`` (idempotent) and ``check()``; ``check()`` verifies that the
vLLM code it wraps still has the shape the patch was written against and raises
``VLLMChangedError`` otherwise (the tests call it, so a vLLM upgrade fails loudly).
"""

import vllm

SUPPORTED_VLLM_VERSIONS = ("0.32.",)


class VLLMChangedError(RuntimeError):
    pass


def require_supported_vllm() -> None:
    if not vllm.__version__.startswith(SUPPORTED_VLLM_VERSIONS):
        raise VLLMChangedError(
            f"vllm-kvq supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM_VERSIONS)}, "
            f"but vLLM {vllm.__version__} is installed; install a supported vLLM.")


def apply_all() -> None:
    from . import cpu_backend_selection, per_layer_kv_spec, request_identity, startup_validation

    require_supported_vllm()
    for patch in (cpu_backend_selection, per_layer_kv_spec, request_identity,
                  startup_validation):
        patch.check()
        patch.apply()
