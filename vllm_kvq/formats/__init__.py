"""Storage formats: one registered class per method, each with the torch reference of its bytes.

Every format module registers itself (``registry.register``) on import; importing this package
imports them all. ``build_codecs`` turns a layer's ``LayerFormat`` into the (key, value)
codecs holding that layer's per-head constants for the local KV heads.
"""

import torch

from . import int_group, kivi, lloyd_max, qjl, raw  # noqa: F401  (registers every format)
from .codec import Codec
from .layer_format import SLOT_ALIGN, LayerFormat
from .registry import FORMATS, StorageFormat, storage_format


def build_codecs(fmt: LayerFormat, head_size: int, dtype: torch.dtype, seed: int, layer: int,
                 global_heads: list[int]) -> tuple[Codec, Codec]:
    # Keys and values of one head must not share random matrices: offset the seed by role.
    return (fmt.key.codec(head_size, dtype, seed * 2, layer, global_heads),
            fmt.value.codec(head_size, dtype, seed * 2 + 1, layer, global_heads))


__all__ = ["FORMATS", "SLOT_ALIGN", "Codec", "LayerFormat", "StorageFormat", "build_codecs",
           "storage_format"]
