"""Compile-time description of one layer's packed slot, shared by every KVQ Triton kernel.

A slot (one token of one KV head) is ``[key field | value field | zero pad]`` (see
``vllm_kvq.formats.spec``). Every kernel receives the layout below as ``tl.constexpr``
arguments, so each distinct format compiles to its own specialized kernel and all field
offsets, bit widths and group sizes are immediates.

Alignment. Slots start 16-byte aligned (slot bytes are a multiple of 16). The key field
starts at byte 0, so its bulk data (codes, sign bits or raw halves) is loaded with 16-byte
vectors. The value field starts at ``key_bytes``, which is not 16-byte aligned for every
format (QJL keys are ``m/8 + 2 + 3*outliers`` bytes: 46 for m=256, o=4). Value codes are
therefore read as an aligned window ``[V_A, V_A + V_CB)`` plus one aligned ``V_CHUNK``-byte
tail chunk; the first ``V_DELTA`` bytes of the window (which belong to the key field) are
replaced by the tail bytes. The result holds every code byte exactly once, rotated by
``V_DELTA`` bytes: element ``e`` of the unpacked tile is channel ``(e - V_C0) mod D`` with
``V_C0 = V_DELTA * 8 / bits``. Kernels fold that rotation into the query / output channel
index, so the bulk stream is always loaded with full-width vectors.
"""

import functools
import os
from dataclasses import asdict, dataclass

import torch

from vllm_kvq.formats.spec import SLOT_ALIGN, CodecSpec, LayerFormat

RAW, INT, QJL, KIVI = 0, 1, 2, 3
_KIND = {"raw": RAW, "int": INT, "qjl": QJL, "kivi": KIVI}
# KIVI key groups the kernels read: a context tile holds whole groups (16..64 tokens).
KIVI_GROUPS = (16, 32, 64)
DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then multiply 16-bit operands in fp32)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KernelLayout:
    D: int  # head size
    SB: int  # slot bytes (multiple of 16)
    KB: int  # key field bytes == byte offset of the value field
    RAW_BF16: bool  # dtype of raw (16-bit passthrough) fields: bf16, else fp16
    # keys
    K_KIND: int
    K_BITS: int
    K_GROUP: int  # channels per scale/min (int keys); tokens per group (KIVI keys)
    K_CB: int  # bulk bytes: int / KIVI codes, QJL sign bits, raw halves
    K_ROT: bool
    QJL_M: int
    QJL_O: int
    QJL_OP: int  # outliers rounded up to a power of two (>= 1)
    # values
    V_KIND: int
    V_BITS: int
    V_GROUP: int
    V_CB: int  # bulk bytes of the value field (codes or raw halves)
    V_ROT: bool
    V_CHUNK: int  # alignment of the value-code window (16, or the field size if smaller)
    V_A: int  # aligned window start (slot-relative bytes)
    V_DELTA: int  # V_OFF - V_A: bytes of the key field at the window start
    V_C0: int  # element rotation of the unpacked value tile
    # Key fields of >= 16 code bytes are consumed per bit position (codecs.key_scores)
    K_SPLIT: bool

    @property
    def VB(self) -> int:
        """Value field bytes (codes plus scales and mins, or raw halves)."""
        return _field_bytes(self.V_KIND, self.V_BITS, self.V_GROUP, self.D, 0, 0)

    def constexprs(self) -> dict:
        return asdict(self)

    def key_qdim(self) -> int:
        """Width of the prepared query the key scores use (D, or the QJL sketch size)."""
        return self.QJL_M if self.K_KIND == QJL else self.D

    def describe(self) -> str:
        def one(kind, bits, group, rot, m=0, o=0):
            if kind == RAW:
                return "raw16"
            if kind == QJL:
                return f"qjl{m}o{o}"
            if kind == KIVI:
                return f"kivi{bits}g{group}"
            return f"{'r' if rot else ''}int{bits}g{group}"
        key = one(self.K_KIND, self.K_BITS, self.K_GROUP, self.K_ROT, self.QJL_M, self.QJL_O)
        return (f"K {key}, V {one(self.V_KIND, self.V_BITS, self.V_GROUP, self.V_ROT)}, "
                f"D{self.D} {self.SB}B")


def _field_bytes(kind: int, bits: int, group: int, d: int, m: int, o: int) -> int:
    if kind == RAW:
        return 2 * d
    if kind == INT:
        return d * bits // 8 + 4 * (d // group)
    if kind == KIVI:  # codes + this slot's piece of its group's statistics
        return d * bits // 8 + 4 * d // group
    return m // 8 + 2 + 3 * o


@functools.lru_cache(maxsize=512)
def make_layout(key: CodecSpec, value: CodecSpec, head_size: int,
                dtype: torch.dtype = torch.bfloat16) -> KernelLayout:
    """The kernel layout of a (key, value) codec-spec pair; raises ValueError if unsupported."""
    d = head_size
    if not is_pow2(d) or d < 16:
        raise ValueError(f"KVQ Triton kernels support power-of-two head sizes >= 16, got {d}")
    if dtype not in DTYPE_CODE:
        raise ValueError(f"KVQ Triton kernels support bf16/fp16 models, got {dtype}")
    if value.kind in ("qjl", "kivi"):
        raise ValueError(f"{value.kind.upper()} is a key-only format")
    if key.kind == "kivi":
        g = key.group_size
        if key.bits not in (1, 2, 4, 8):
            raise ValueError(f"unsupported bit width {key.bits}")
        if g not in KIVI_GROUPS or (4 * d) % g or (4 * d // g) % 2:
            raise ValueError(f"KVQ Triton kernels read KIVI key groups of "
                             f"{', '.join(map(str, KIVI_GROUPS))} tokens with at least two "
                             f"statistics bytes per slot (group <= 2 x head size), got "
                             f"{g}-token groups at head size {d}")
    for spec in (key, value):
        if spec.kind == "int":
            if spec.bits not in (1, 2, 4, 8):
                raise ValueError(f"unsupported bit width {spec.bits}")
            if not is_pow2(spec.group_size) or spec.group_size > d or spec.group_size < 8:
                raise ValueError(f"unsupported group size {spec.group_size} for head size {d}")
    k_kind, v_kind = _KIND[key.kind], _KIND[value.kind]
    m = key.sketch_dim if k_kind == QJL else 0
    o = key.outliers if k_kind == QJL else 0
    if k_kind == QJL and (not is_pow2(m) or m < 64 or not 0 <= o < d):
        raise ValueError(f"unsupported QJL sketch (m={m}, outliers={o})")
    kb = _field_bytes(k_kind, key.bits, key.group_size, d, m, o)
    vb = _field_bytes(v_kind, value.bits, value.group_size, d, 0, 0)
    sb = -(-(kb + vb) // SLOT_ALIGN) * SLOT_ALIGN
    if k_kind == RAW:
        k_cb = 2 * d
    elif k_kind in (INT, KIVI):
        k_cb = d * key.bits // 8
    else:
        k_cb = m // 8
    v_bits = value.bits if v_kind == INT else 16
    v_cb = d * v_bits // 8
    if v_kind == INT:
        chunk = min(16, v_cb)
        v_a = kb // chunk * chunk
        delta = kb - v_a
        c0 = delta * 8 // value.bits
    else:
        chunk, v_a, delta, c0 = 16, kb, 0, 0
    return KernelLayout(
        D=d, SB=sb, KB=kb, RAW_BF16=dtype == torch.bfloat16,
        K_KIND=k_kind,
        K_BITS=key.bits if k_kind in (INT, KIVI) else (16 if k_kind == RAW else 1),
        K_GROUP=key.group_size if k_kind in (INT, KIVI) else d, K_CB=k_cb,
        K_ROT=bool(k_kind == INT and key.rotate), QJL_M=m, QJL_O=o, QJL_OP=_pow2(max(o, 1)),
        V_KIND=v_kind, V_BITS=v_bits, V_GROUP=value.group_size if v_kind == INT else d,
        V_CB=v_cb, V_ROT=bool(v_kind == INT and value.rotate),
        V_CHUNK=chunk, V_A=v_a, V_DELTA=delta, V_C0=c0,
        K_SPLIT=k_kind in (INT, QJL, KIVI) and k_cb >= 16)


def layout_for_format(fmt: LayerFormat, head_size: int,
                      dtype: torch.dtype = torch.bfloat16) -> KernelLayout:
    return make_layout(fmt.key, fmt.value, head_size, dtype)


def spec_of_codec(codec) -> CodecSpec:
    """Recover the CodecSpec a codec object was built from (codecs hold their parameters)."""
    from vllm_kvq.formats.int_group import IntGroupCodec
    from vllm_kvq.formats.kivi import KIVIKeyCodec
    from vllm_kvq.formats.qjl import QJLKeyCodec
    from vllm_kvq.formats.raw import RawCodec
    if isinstance(codec, RawCodec):
        return CodecSpec("raw")
    if isinstance(codec, IntGroupCodec):
        return CodecSpec("int", bits=codec.bits, group_size=codec.group_size,
                         rotate=codec.rot is not None)
    if isinstance(codec, KIVIKeyCodec):
        return CodecSpec("kivi", bits=codec.bits, group_size=codec.group_tokens)
    if isinstance(codec, QJLKeyCodec):
        return CodecSpec("qjl", sketch_dim=codec.sketch_dim, outliers=codec.outliers)
    raise ValueError(f"no Triton kernel for codec {type(codec).__name__}")


def layout_for_codecs(key_codec, value_codec, head_size: int,
                      dtype: torch.dtype | None = None) -> KernelLayout:
    if dtype is None:
        dtype = next((c.dtype for c in (key_codec, value_codec) if hasattr(c, "dtype")),
                     torch.bfloat16)
    return make_layout(spec_of_codec(key_codec), spec_of_codec(value_codec), head_size, dtype)


# ---------------------------------------------------------------------------------------------
# Launch configurations. Every choice depends only on the layout and static sizes (never on
# context lengths or block sizes), so a launch configuration is fixed per (layout, query rows)
# and can be captured in a CUDA graph. Each function returns (constexprs, num_warps,
# num_stages, maxnreg); the launchers and benchmarks/compile_report.py both use them, so the report
# compiles exactly what the backend launches. The fourth element, maxnreg, is a register cap
# for ptxas (None: ptxas decides; its occupancy heuristic sometimes picks 128 registers and
# spills a few bytes, which a cap of 255 prevents).

VEC_BYTES = 16  # the width of one vector load
CONTEXT_MIN_ROWS = 8  # query rows are the N side of the context kernel's dots (mma n8)


def rows_pad(rows: int, minimum: int = 16) -> int:
    """Query rows of a tile padded to a power of two (>= minimum)."""
    return max(minimum, _pow2(rows))


def context_launch(layout: KernelLayout, rows: int, is_decode: bool, upcast: bool = False,
                   row_limits: bool = False):
    """paged_context_kernel. A tile of BLOCK_N tokens x the smallest bulk field (key codes /
    sign bits / raw halves, value code window) must hold at least 16 bytes per thread --
    Triton gives each thread at most bytes/threads contiguous bytes, so smaller tiles cannot
    use 16-byte loads -- so BLOCK_N * min_field = 512 * num_warps, with BLOCK_N capped at 64
    tokens (and 16384 / widest unpacked row) to keep the unpacked tiles in registers: fields
    of 16 bytes run 64 tokens on 2 warps. Every configuration is checked for spills and load
    widths by benchmarks/compile_report.py. Known exceptions: the 16-byte wrap chunk of a
    misaligned value field is not sized for (8-byte loads at 64 tokens x 4 warps), and at head
    size 256 a 16-byte key field (QJL m=128) keeps 4 warps (8-byte loads), since 2 warps would
    need a [64, 256] value tile per warp pair and spill. KIVI keys: the same rule, but at
    least one key group (K_GROUP tokens, 16..64) so a tile holds whole groups, at least 2
    warps (4 from head size 128: 16-byte code fields then load 8 bytes per thread), and a
    register cap of 255 in prefill and at head size 256 (else ptxas caps some at 168 and
    spills a few bytes on sm_80)."""
    min_cb = min(layout.K_CB, layout.V_CB)
    widest = max(layout.D, layout.QJL_M)
    bn = _pow2(-(-VEC_BYTES * 32 * 4 // min_cb))
    bn = max(16, min(bn, 64, 16384 // widest))
    if layout.K_KIND == KIVI:  # whole key groups per tile (their statistics scale the query)
        bn = max(bn, layout.K_GROUP)
    warps = max(1, min(4, bn * min_cb // (VEC_BYTES * 32)))
    if layout.D >= 256:
        warps = 4
    if layout.K_KIND == KIVI:  # room for the per-group query operands (at D >= 128 with
        warps = max(warps, 2 if layout.D <= 64 else 4)  # 16-byte fields: 8-byte loads)
    ce = dict(layout.constexprs(), QK=layout.key_qdim(), MP=rows_pad(rows, CONTEXT_MIN_ROWS),
              BLOCK_N=bn, IS_DECODE=is_decode, ROW_LIMITS=bool(row_limits), UPCAST=upcast)
    # QJL tiles with a 16-byte sketch at D >= 128, or any QJL at D = 256, need ~170-250
    # registers; left alone, ptxas caps some of them at 168 and spills a few bytes on sm_80.
    # KIVI tiles likewise at D = 256 and in prefill (decode below 256 fits either way, and
    # gains occupancy from ptxas' own choice).
    heavy = (layout.K_KIND == KIVI and (layout.D >= 256 or not is_decode)) or (
        layout.K_KIND == QJL and (layout.D >= 256 or (layout.K_CB < 32 and layout.D >= 128)))
    return ce, warps, 1, 255 if heavy else None


def merge_launch(layout: KernelLayout, rows: int, is_decode: bool, upcast: bool = False,
                 window: bool = False, row_limits: bool = False):
    """merge_fresh_kernel: BLOCK_F fresh (and exact-window) tokens per step of its loops
    (flash-attention style for prefill, where 8 warps keep the [rows, D] accumulator and K/V
    tiles in registers without spilling). ``window``: the layer reads an exact recent window
    from its ring (a constexpr, so layers without one compile exactly as before).
    ``row_limits``: prefill rows read only their last keys exactly (``vllm_kvq.exactness``)."""
    mp = rows_pad(rows)
    block_f = 16 if is_decode or layout.D >= 256 else 32
    ce = dict(D=layout.D, V_ROT=layout.V_ROT, MP=mp, BLOCK_F=block_f, BK=min(32, layout.D),
              IS_DECODE=is_decode, WINDOW=bool(window), ROW_LIMITS=bool(row_limits),
              UPCAST=upcast)
    return ce, 4 if is_decode or layout.D <= 64 else 8, 1 if is_decode else 2, None


def prefill_block_q(layout: KernelLayout, gqa: int, kernel: str) -> int:
    """Query tokens per prefill tile. The context kernel keeps its query tile as the N side
    of its dots (every warp holds all of it): 32 rows, 16 for KIVI keys (whose per-group
    scaled query operands take registers too), 8 for QJL keys or head size 256. The
    merge kernel (exact causal attention to the chunk) uses about 64 rows (32 at D=256)."""
    if kernel == "context":
        target = (8 if layout.K_KIND == QJL or layout.D >= 256 else
                  16 if layout.K_KIND == KIVI else 32)
    else:
        target = 32 if layout.D >= 256 else 64
    return max(1, target // _pow2(gqa))


def store_launch(layout: KernelLayout):
    """store_kernel: BT tokens per program; rotation / projection in chunks of columns."""
    d = layout.D

    def chunk(group):  # quantization chunk: >= 16 channels, whole groups
        return min(d, max(group, 32))

    mc = 16
    if layout.K_KIND == QJL:
        mc = min(layout.QJL_M, 64)
    pad = layout.SB - layout.KB - layout.VB
    ce = dict(layout.constexprs(), VB=layout.VB, PADP=_pow2(pad) if pad > 0 else 0,
              KCC=chunk(layout.K_GROUP) if layout.K_KIND == INT else 16,
              VCC=chunk(layout.V_GROUP) if layout.V_KIND == INT else 16, MC=mc, KC=32, BT=16)
    # Off the decode path: never let ptxas trade spills for occupancy here.
    return ce, 8 if layout.K_KIND == QJL and d >= 256 else 4, 1, 255
