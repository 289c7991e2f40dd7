"""Storage formats: one codec per method, each a torch reference of its byte layout.

``build_codecs`` turns a layer's ``LayerFormat`` into the (key, value) codecs holding that
layer's per-head constants for the local KV heads.
"""

import torch

from .codec import Codec
from .int_group import IntGroupCodec
from .kivi import KIVIKeyCodec
from .qjl import QJLKeyCodec
from .raw import RawCodec
from .spec import SLOT_ALIGN, CodecSpec, LayerFormat


def build_codec(spec: CodecSpec, head_size: int, dtype: torch.dtype, seed: int, layer: int,
                global_heads: list[int], purpose: str) -> Codec:
    # Keys and values of one head must not share random matrices: offset the seed by purpose.
    seed = seed * 2 + (purpose == "value")
    if spec.kind == "raw":
        return RawCodec(head_size, dtype)
    if spec.kind == "int":
        return IntGroupCodec(head_size, spec.bits, spec.group_size, spec.rotate,
                             seed, layer, global_heads)
    if spec.kind == "kivi":
        return KIVIKeyCodec(head_size, spec.bits, spec.group_size)
    if spec.kind == "qjl":
        return QJLKeyCodec(head_size, spec.sketch_dim, spec.outliers, seed, layer, global_heads)
    raise ValueError(f"unknown codec kind {spec.kind!r}")


def build_codecs(fmt: LayerFormat, head_size: int, dtype: torch.dtype, seed: int, layer: int,
                 global_heads: list[int]) -> tuple[Codec, Codec]:
    return (build_codec(fmt.key, head_size, dtype, seed, layer, global_heads, "key"),
            build_codec(fmt.value, head_size, dtype, seed, layer, global_heads, "value"))


__all__ = ["SLOT_ALIGN", "Codec", "CodecSpec", "LayerFormat", "build_codec", "build_codecs"]
