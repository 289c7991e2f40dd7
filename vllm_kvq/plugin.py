"""vLLM entry points, and the composition root of the patches.

Two groups point here, because vLLM pickles ``AttentionBackendEnum.KVQ`` into every spawned
process (engine core, workers, Ray actors) and unpickles it before general plugins load:
- ``vllm.platform_plugins`` -> ``register_backend_name``: runs at import time of vLLM in
  every process (when ``current_platform`` is resolved); it only adds the enum member and
  returns None, so the platform is left alone.
- ``vllm.general_plugins`` -> ``register``: adds the member (if needed) and applies the
  version-guarded patches in ``vllm_kvq.patches``, handing them KVQ's behaviour (``hooks``):
  the patches import nothing from ``vllm_kvq``.

This module is imported while vLLM itself is (platform plugin), so it imports no vLLM and no
other ``vllm_kvq`` module at import time; the hooks import theirs when first called.
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

    apply_all(hooks())
    if ray_on_cpu.enabled():  # test-only: VLLM_KVQ_ALLOW_RAY_ON_CPU=1, see its docstring
        ray_on_cpu.check()
        ray_on_cpu.apply()


def hooks():
    """The ``vllm_kvq.patches.Hooks`` that connect the patches to KVQ."""
    from vllm_kvq import window
    from vllm_kvq.patches import Hooks

    return Hooks(slot_bytes=layer_slot_bytes, publish_batch=window.publish_batch,
                 release_requests=window.release_requests, validate=validate,
                 warn_unread=warn_unread, refuse=refuse, hit_alignment=hit_alignment)


def layer_slot_bytes(vllm_config, layer_name: str, head_size: int) -> int:
    """Bytes per token and KV head of the layer's page; the backend keys layers the same way."""
    from vllm_kvq.config import layer_token_head_bytes

    return layer_token_head_bytes(vllm_config, layer_name, head_size)


# vllm_kvq.validation imports the backend, hence vLLM's attention code: only on first use.
def validate(vllm_config) -> None:
    from vllm_kvq.validation import validate_vllm_config

    validate_vllm_config(vllm_config)


def hit_alignment(vllm_config) -> int | None:
    from vllm_kvq.exactness import prefix_hit_alignment

    return prefix_hit_alignment(vllm_config)


def refuse(message: str) -> None:
    from vllm_kvq.config import KVQConfigError

    raise KVQConfigError(message)


def warn_unread(vllm_config, kvq_backend: bool) -> None:
    from vllm_kvq.validation import warn_unread_settings

    warn_unread_settings(vllm_config, kvq_backend=kvq_backend)
