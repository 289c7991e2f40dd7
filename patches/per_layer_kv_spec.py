"""Give every KVQ layer its own page size (per-layer formats and bits).

``AttentionBackend.customize_spec`` gets no layer identity, so the per-layer choice wraps
``Attention.get_kv_cache_spec(self, vllm_config)`` (vllm/model_executor/layers/attention/
attention.py), where ``self.layer_name`` is known. The page size comes from the
``slot_bytes(vllm_config, layer_name, head_size)`` callback given to ``apply``; it must be a
pure function of the config and layer, so it is identical on every TP rank (vLLM asserts
that). Sliding-window layers keep vLLM's ``SlidingWindowSpec`` (its block manager frees the
blocks that leave the window), with the packed page.
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from . import BACKEND_NAME, VLLMChangedError, check_parameters, wrap

# Read by the wrapper on every call, so a later apply() swaps it without wrapping again.
_slot_bytes: Callable[[Any, str, int], int] | None = None


def _target():
    from vllm.model_executor.layers.attention import Attention

    return Attention


def check() -> None:
    from vllm.v1.kv_cache_interface import AttentionSpec

    check_parameters(_target().get_kv_cache_spec, ["self", "vllm_config"], __name__,
                     "Attention.get_kv_cache_spec")
    fields = AttentionSpec.__dataclass_fields__
    if "state_content_bytes" not in fields:
        raise VLLMChangedError("AttentionSpec has no state_content_bytes field any more; "
                               "patches/per_layer_kv_spec.py must be updated for this vLLM.")


def apply(slot_bytes: Callable[[Any, str, int], int]) -> None:
    """``slot_bytes(vllm_config, layer_name, head_size)``: the bytes one token of one KV head
    takes in that layer's page."""
    global _slot_bytes
    _slot_bytes = slot_bytes
    wrap(_target(), "get_kv_cache_spec", _per_layer_page)


def _per_layer_page(original):
    def get_kv_cache_spec(self, vllm_config):
        if self.attn_backend.get_name() != BACKEND_NAME:
            return original(self, vllm_config)
        from vllm.config import set_current_vllm_config

        # vLLM sizes sliding-window blocks by calling customize_spec in here, which has no
        # config argument: make the one vLLM passes in the current one.
        with set_current_vllm_config(vllm_config):
            spec = original(self, vllm_config)
        if spec is None:
            return spec
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

        if type(spec) not in (FullAttentionSpec, SlidingWindowSpec):
            raise ValueError(f"The KVQ attention backend supports full and sliding-window "
                             f"attention; layer {self.layer_name} needs {type(spec).__name__}.")
        return replace(spec, dtype=torch.uint8, state_content_bytes=_slot_bytes(
            vllm_config, self.layer_name, spec.head_size))

    return get_kv_cache_spec
