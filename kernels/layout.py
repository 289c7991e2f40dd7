"""Compile-time description of one layer's packed slot, shared by every KVQ Triton kernel.

A slot (one token of one KV head) is ``[key field | value field | zero pad]`` (see
``vllm_kvq.formats.layer_format``). Every kernel receives the layout below as ``tl.constexpr``
arguments, so each distinct format compiles to its own specialized kernel and all field
offsets, bit widths and group sizes are immediates.

Alignment. Slots start 8-byte aligned (slot bytes are a multiple of 8; of 16 for most
formats, and the compiler sees which through ``SB``). The key field starts at byte 0, so its
bulk data (codes, sign bits or raw halves) is loaded with 16-byte vectors where the slot size
allows, 8-byte ones otherwise. The value field starts at ``key_bytes``, which is not 16-byte
aligned for every format (QJL keys are ``m/8 + 2 + 3*outliers`` bytes: 46 for m=256, o=4).
Value codes are therefore read as an aligned window ``[V_A, V_A + V_CB)`` plus one aligned
``V_CHUNK``-byte tail chunk; the first ``V_DELTA`` bytes of the window (which belong to the
key field) are replaced by the tail bytes. The result holds every code byte exactly once,
rotated by ``V_DELTA`` bytes: element ``e`` of the unpacked tile is channel
``(e - V_C0) mod D`` with ``V_C0 = V_DELTA * 8 / bits``. Kernels fold that rotation into the
query / output channel index, so the bulk stream is loaded with the widest vectors the
slot's alignment allows.
"""

import functools
from dataclasses import dataclass, field, fields

import torch

from vllm_kvq.formats import LayerFormat, StorageFormat
from vllm_kvq.formats.registry import is_pow2

from .formats import KINDS

KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # of raw fields and queries


@dataclass(frozen=True)
class KernelLayout:
    D: int  # head size
    SB: int  # slot bytes (multiple of 8)
    KB: int  # key field bytes == byte offset of the value field
    RAW_BF16: bool  # dtype of raw (16-bit passthrough) fields: bf16, else fp16
    # keys (kinds: kernels/formats/)
    K_KIND: int
    K_BITS: int
    K_GROUP: int  # channels per scale/min (int keys); tokens per group (KIVI keys)
    K_CB: int  # bulk bytes: int / KIVI codes, QJL sign bits, raw halves
    K_ROT: bool
    QJL_M: int  # key-format extras (QJL: sketch rows, outliers, outliers rounded up to a
    QJL_O: int  # power of two); zero for other formats
    QJL_OP: int
    # values
    V_KIND: int
    V_BITS: int
    V_GROUP: int
    V_CB: int  # bulk bytes of the value field (codes or raw halves)
    V_ROT: bool
    V_CHUNK: int  # alignment of the value-code window (16; 8 where a 16-byte tail would leave
    #               the slot; the field size if smaller)
    V_A: int  # aligned window start (slot-relative bytes)
    V_DELTA: int  # V_OFF - V_A: bytes of the key field at the window start
    V_C0: int  # element rotation of the unpacked value tile
    # Key fields of >= 16 code bytes are consumed per bit position (formats.key_scores)
    K_SPLIT: bool
    # Not constexprs: the formats themselves.
    key: StorageFormat = field(compare=False)
    value: StorageFormat = field(compare=False)

    @property
    def VB(self) -> int:
        """Value field bytes (codes plus scales and mins, or raw halves)."""
        return self.value.nbytes(self.D)

    def constexprs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("key", "value")}

    def key_qdim(self) -> int:
        """Width of the prepared query the key scores use (D, or the QJL sketch size)."""
        return self.key.query_width(self.D)

    def describe(self) -> str:
        return f"K {self.key.tag()}, V {self.value.tag()}, D{self.D} {self.SB}B"


def layout_gap(key: StorageFormat, value: StorageFormat, head_size: int,
               dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run this (key, value) pair, or None."""
    d = head_size
    if not is_pow2(d) or d < 16:
        return f"KVQ Triton kernels support power-of-two head sizes >= 16, got {d}"
    if dtype not in KERNEL_DTYPES:
        return f"KVQ Triton kernels support bf16/fp16 models, got {dtype}"
    for role, spec in (("key", key), ("value", value)):
        if spec.kernel_kind not in KINDS:
            return f"the Triton kernels have no pieces for {spec.kind} codes"
        gap = spec.kernel_gap(role, d)
        if gap:
            return gap
    return None


def kernel_gap(fmt: LayerFormat, head_size: int, dtype) -> str | None:
    """Why the kernels cannot run this layer format, or None (``dispatch.Kernels.gap``)."""
    return layout_gap(fmt.key, fmt.value, head_size, dtype)


def _value_window(kb: int, vf: dict, sb: int) -> tuple[int, int, int, int]:
    """(V_CHUNK, V_A, V_DELTA, V_C0) of a value field at slot byte ``kb`` in an ``sb``-byte
    slot: packed codes (under 16 bits) are read as an aligned window rotated by V_DELTA bytes
    (module docstring); raw halves and 3-bit planes are read in place. The tail chunk must end
    inside the slot (the last slot of the cache has nothing after it): where a 16-byte chunk
    would not, 8-byte chunks do, since slots are 8-byte multiples and code fields too."""
    if vf["BITS"] >= 16 or vf["BITS"] == 3:  # 3-bit planes are read in place (int_tile)
        return 16, kb, 0, 0
    chunk = min(16, vf["CB"])
    if (kb % chunk) and kb // chunk * chunk + vf["CB"] + chunk > sb:
        chunk = min(8, vf["CB"])
    v_a = kb // chunk * chunk
    assert kb == v_a or v_a + vf["CB"] + chunk <= sb, "value window tail leaves the slot"
    return chunk, v_a, kb - v_a, (kb - v_a) * 8 // vf["BITS"]


@functools.lru_cache(maxsize=512)
def make_layout(key: StorageFormat, value: StorageFormat, head_size: int,
                dtype: torch.dtype = torch.bfloat16) -> KernelLayout:
    """The kernel layout of a (key, value) format pair; raises ValueError if unsupported."""
    gap = layout_gap(key, value, head_size, dtype)
    if gap:
        raise ValueError(gap)
    d = head_size
    kf, vf = key.kernel_fields(d), value.kernel_fields(d)
    kb = key.nbytes(d)
    sb = LayerFormat(key, value).slot_bytes(d)  # the cache's slot, padding included
    chunk, v_a, delta, c0 = _value_window(kb, vf, sb)
    extra = {"QJL_M": 0, "QJL_O": 0, "QJL_OP": 1, **kf["extra"]}
    return KernelLayout(
        D=d, SB=sb, KB=kb, RAW_BF16=dtype == torch.bfloat16,
        K_KIND=kf["KIND"], K_BITS=kf["BITS"], K_GROUP=kf["GROUP"], K_CB=kf["CB"],
        K_ROT=bool(kf["ROT"]), **extra,
        V_KIND=vf["KIND"], V_BITS=vf["BITS"], V_GROUP=vf["GROUP"], V_CB=vf["CB"],
        V_ROT=bool(vf["ROT"]), V_CHUNK=chunk, V_A=v_a, V_DELTA=delta, V_C0=c0,
        K_SPLIT=bool(kf["SPLIT"]), key=key, value=value)


def layout_for_format(fmt: LayerFormat, head_size: int,
                      dtype: torch.dtype = torch.bfloat16) -> KernelLayout:
    return make_layout(fmt.key, fmt.value, head_size, dtype)


def layout_for_codecs(key_codec, value_codec, head_size: int,
                      dtype: torch.dtype) -> KernelLayout:
    """The layout of a codec pair: codecs carry the format they are the reference of."""
    return make_layout(key_codec.spec, value_codec.spec, head_size, dtype)
