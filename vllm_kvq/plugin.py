"""vLLM entry points.

Two groups point here, because vLLM pickles ``AttentionBackendEnum.KVQ`` into every spawned
process (engine core, workers, Ray actors) and unpickles it before general plugins load:
- ``vllm.platform_plugins`` -> ``register_backend_name``: runs at import time of vLLM in
  every process (when ``current_platform`` is resolved); it only adds the enum member and
  returns None, so the platform is left alone.
- ``vllm.general_plugins`` -> ``register``: adds the member (if needed) and applies the
  version-guarded patches in ``vllm_kvq.patches``.
"""

BACKEND_CLASS = "vllm_kvq.backend.KVQBackend"


def register_backend_name() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "KVQ" not in AttentionBackendEnum.__members__:
        # Always pass the class path: without it the member's value is "" and aliases
        # TORCH_SDPA.
        register_backend("KVQ", BACKEND_CLASS)
    return None


def register() -> None:
    register_backend_name()
    from vllm_kvq.patches import apply_all, ray_on_cpu

    apply_all()
    if ray_on_cpu.enabled():  # test-only: VLLM_KVQ_ALLOW_RAY_ON_CPU=1, see its docstring
        ray_on_cpu.check()
        ray_on_cpu.apply()
