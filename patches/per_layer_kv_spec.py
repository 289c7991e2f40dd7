"""Give every KVQ layer its own page size (per-layer formats and bits).

``AttentionBackend.customize_spec`` gets no layer identity, so the per-layer choice wraps
``Attention.get_kv_cache_spec(self, vllm_config)`` (vllm/model_executor/layers/attention/
attention.py), where ``self.layer_name`` is known. The choice is a pure function of the
config and layer index, so it is identical on every TP rank (vLLM asserts that).
"""

import inspect
from dataclasses import replace

import torch

from . import VLLMChangedError

_MARK = "_kvq_patched"


def _target():
    from vllm.model_executor.layers.attention import Attention

    return Attention


def check() -> None:
    from vllm.v1.kv_cache_interface import AttentionSpec

    fn = _target().get_kv_cache_spec
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    if params != ["self", "vllm_config"]:
        raise VLLMChangedError(f"Attention.get_kv_cache_spec changed its parameters to {params}; "
                               "patches/per_layer_kv_spec.py must be updated for this vLLM.")
    fields = AttentionSpec.__dataclass_fields__
    if "state_content_bytes" not in fields:
        raise VLLMChangedError("AttentionSpec has no state_content_bytes field any more; "
                               "patches/per_layer_kv_spec.py must be updated for this vLLM.")


def apply() -> None:
    cls = _target()
    original = cls.get_kv_cache_spec
    if getattr(original, _MARK, False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or self.attn_backend.get_name() != "KVQ":
            return spec
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from vllm_kvq.config import config_from_vllm
        from vllm_kvq.layers import layer_index

        if type(spec) is not FullAttentionSpec:
            raise ValueError(f"The KVQ attention backend supports full attention only; layer "
                             f"{self.layer_name} needs {type(spec).__name__}.")
        fmt = config_from_vllm(vllm_config).layer_format(layer_index(self.layer_name))
        return replace(spec, dtype=torch.uint8,
                       state_content_bytes=fmt.slot_bytes(spec.head_size))

    get_kv_cache_spec.__wrapped__ = original
    setattr(get_kv_cache_spec, _MARK, True)
    cls.get_kv_cache_spec = get_kv_cache_spec
