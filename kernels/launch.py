"""Launch tuning of the KVQ kernels (tile sizes, warps, stages, register caps, splits) and
the planned launch (``Launch``) the launchers build and the compile report compiles.

Every choice depends only on the layout and static sizes (never on context lengths or block
sizes), so a launch configuration is fixed per (layout, query rows) and can be captured in a
CUDA graph. Each tuning function returns (constexprs, num_warps, num_stages, maxnreg); maxnreg
is a register cap for ptxas (None: ptxas decides; its occupancy heuristic sometimes picks 128
registers and spills a few bytes, which a cap of 255 prevents).
"""

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from vllm_kvq.formats.registry import pow2_at_least

from . import formats
from .layout import KernelLayout

# Tuning depends on the format family: the named kernel kinds, as host integers.
INT, KIVI, QJL = (kind.value for kind in (formats.INT, formats.KIVI, formats.QJL))


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then multiply 16-bit operands in fp32)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


VEC_BYTES = 16  # the width of one vector load
CONTEXT_MIN_ROWS = 8  # query rows are the N side of the context kernel's dots (mma n8)


def rows_pad(rows: int, minimum: int = 16) -> int:
    """Query rows of a tile padded to a power of two (>= minimum)."""
    return max(minimum, pow2_at_least(rows))


def _stream_bytes(bits: int, cb: int) -> int:
    """Bytes per token of a field's widest contiguous load: 3-bit codes are two planes, the
    plane of low bits holding 2/3 of them."""
    return cb * 2 // 3 if bits == 3 else cb


def context_launch(layout: KernelLayout, rows: int, is_decode: bool, upcast: bool = False,
                   row_limits: bool = False, first_keys: bool = False):
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
    min_cb = min(_stream_bytes(layout.K_BITS, layout.K_CB),
                 _stream_bytes(layout.V_BITS, layout.V_CB))
    widest = max(layout.D, layout.QJL_M)
    bn = pow2_at_least(-(-VEC_BYTES * 32 * 4 // min_cb))
    bn = max(16, min(bn, 64, 16384 // widest))
    if layout.K_KIND == KIVI:  # whole key groups per tile (their statistics scale the query)
        bn = max(bn, layout.K_GROUP)
    warps = max(1, min(4, bn * min_cb // (VEC_BYTES * 32)))
    if layout.D >= 256:
        warps = 4
    if layout.K_KIND == KIVI:  # room for the per-group query operands (at D >= 128 with
        warps = max(warps, 2 if layout.D <= 64 else 4)  # 16-byte fields: 8-byte loads)
    mp = rows_pad(rows, CONTEXT_MIN_ROWS)
    ce = dict(layout.constexprs(), QK=layout.key_qdim(), MP=mp,
              K_FOLD=folds_keys(layout, mp), V_FOLD=folds_values(layout, mp),
              BLOCK_N=bn, IS_DECODE=is_decode, ROW_LIMITS=bool(row_limits),
              FIRST_KEYS=bool(first_keys), UPCAST=upcast)
    # QJL tiles with a 16-byte sketch at D >= 128, or any QJL at D = 256, need ~170-250
    # registers; left alone, ptxas caps some of them at 168 and spills a few bytes on sm_80.
    # KIVI tiles likewise at D = 256 and in prefill (decode below 256 fits either way, and
    # gains occupancy from ptxas' own choice).
    # 3-bit fields (whole-tile unpacking of two planes) likewise on sm_80 at D = 64 and 256.
    # Sliding-window layers (each row's lower key bound) likewise for several int formats.
    # Int-key prefill tiles from head size 128 likewise (16 bytes spilled on sm_80 at 4/4 bits
    # with row limits once the block lookup became a 64-bit multiply).
    # Slots that are 8-byte but not 16-byte multiples likewise: their bulk loads are 8 bytes
    # wide, twice the loads in flight (qjl128v2 at D = 64, 56-byte slots: 8-56 bytes spilled).
    heavy = bool(layout.SB % 16) or (
        layout.K_KIND == KIVI and (layout.D >= 256 or not is_decode)) or (
        layout.K_KIND == INT and layout.D >= 128 and not is_decode) or (
        layout.K_KIND == QJL and (layout.D >= 256 or (layout.K_CB < 32 and layout.D >= 128))) or (
        3 in (layout.K_BITS, layout.V_BITS)) or bool(first_keys)
    return ce, warps, 1, 255 if heavy else None


def block_divisor(block_size: int) -> tuple[int, int]:
    """(M, S) with ``pos // block_size == (pos * M) >> S`` for every 0 <= pos < 2**31: the
    context kernel's per-token block lookup as one wide multiply and a shift instead of an
    integer division (about 20 instructions per token). S = 31 + ceil(log2(block_size)),
    M = ceil(2**S / block_size) < 2**32; exact because M * block_size - 2**S < block_size
    <= 2**(S - 31) (Granlund and Montgomery, 1994)."""
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    shift = 31 + (block_size - 1).bit_length()
    return -(-(1 << shift) // block_size), shift


FOLDED_COLUMNS = 32  # the most query columns a folded operand spreads over (registers)


def folds_keys(layout: KernelLayout, mp: int) -> bool:
    """Whether the context kernel folds int keys' group scales out of its dots
    (``int_key_scores``): codes consumed per bit position, each query piece spread over one
    column block per key group, so only while that stays within FOLDED_COLUMNS (the
    pieces are kept in registers across the loop; decode up to head size 128 with 32-channel
    groups)."""
    return (layout.K_KIND == INT and layout.K_SPLIT
            and (layout.D // layout.K_GROUP) * mp <= FOLDED_COLUMNS)


FOLD_BYTES, FOLD_WORDS = 1, 2  # V_FOLD: codes unpacked from bytes, or from int32 words


def folds_values(layout: KernelLayout, mp: int) -> int:
    """How the context kernel reads int values (``V_FOLD``): 0, dequantized before the dot;
    otherwise each group's scale folded into the softmax weights (``int_value_update``),
    whose accumulator holds one column block of query rows per value group, so only while
    that stays within FOLDED_COLUMNS (decode up to head size 128 with 32-channel
    groups). FOLD_WORDS where the code field is read as int32 words (1/2/4/8-bit codes at
    a 4-byte aligned offset: ``word_values``), FOLD_BYTES otherwise (3-bit planes, fields
    after a QJL key field)."""
    if layout.V_KIND != INT or (layout.D // layout.V_GROUP) * mp > FOLDED_COLUMNS:
        return 0
    return FOLD_WORDS if layout.V_BITS != 3 and layout.KB % 4 == 0 else FOLD_BYTES


def merge_launch(layout: KernelLayout, rows: int, is_decode: bool, upcast: bool = False,
                 window: bool = False, row_limits: bool = False, first_keys: bool = False):
    """merge_fresh_kernel: BLOCK_F fresh (and exact-window) tokens per step of its loops
    (flash-attention style for prefill, where 8 warps keep the [rows, D] accumulator and K/V
    tiles in registers without spilling). ``window``: the layer reads an exact recent window
    from its ring (a constexpr, so layers without one compile exactly as before).
    ``row_limits``: prefill rows read only their last keys exactly (``vllm_kvq.exactness``).
    ``first_keys``: a sliding-window layer (each row's first visible key)."""
    mp = rows_pad(rows)
    block_f = 16 if is_decode or layout.D >= 256 else 32
    ce = dict(D=layout.D, V_ROT=layout.V_ROT, MP=mp, BLOCK_F=block_f, BK=min(32, layout.D),
              IS_DECODE=is_decode, WINDOW=bool(window), ROW_LIMITS=bool(row_limits),
              FIRST_KEYS=bool(first_keys), UPCAST=upcast)
    # Prefill at head size 64 fits 4 warps, but with row limits or a sliding window (a per-row
    # exact range) it reaches 255 registers and spills a few bytes on sm_80: 8 warps, as for
    # D >= 128.
    small = is_decode or (layout.D <= 64 and not (row_limits or first_keys))
    return ce, 4 if small else 8, 1 if is_decode else 2, None


def prefill_block_q(layout: KernelLayout, gqa: int, kernel: str, sliding: bool = False) -> int:
    """Query tokens per prefill tile. The context kernel keeps its query tile as the N side
    of its dots (every warp holds all of it): 32 rows, 16 for KIVI keys (whose per-group
    scaled query operands take registers too) and for sliding-window layers (each row's
    lower key bound: 32 rows of 8-bit codes at D=128 spill on sm_80 even at 255 registers),
    8 for QJL keys or head size 256. The merge kernel (exact causal attention to the chunk)
    uses about 64 rows (32 at D=256)."""
    if kernel == "context":
        target = (8 if layout.K_KIND == QJL or layout.D >= 256 else
                  16 if layout.K_KIND == KIVI or sliding else 32)
    else:
        target = 32 if layout.D >= 256 else 64
    return max(1, target // pow2_at_least(gqa))


def store_launch(layout: KernelLayout):
    """store_kernel: BT tokens per program; rotation / projection in chunks of columns."""
    d = layout.D

    def chunk(group):  # quantization chunk: >= 16 channels, whole groups
        return min(d, max(group, 32))

    mc = 16
    if layout.K_KIND == QJL:
        mc = min(layout.QJL_M, 64)
    pad = layout.SB - layout.KB - layout.VB
    ce = dict(layout.constexprs(), VB=layout.VB, PADP=pow2_at_least(pad) if pad > 0 else 0,
              KCC=chunk(layout.K_GROUP) if layout.K_KIND == INT else 16,
              VCC=chunk(layout.V_GROUP) if layout.V_KIND == INT else 16, MC=mc, KC=32, BT=16)
    # Off the decode path: never let ptxas trade spills for occupancy here.
    return ce, 8 if layout.K_KIND == QJL and d >= 256 else 4, 1, 255


@functools.lru_cache(maxsize=None)
def _sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132  # an H100 SXM, for CPU runs of the same launch logic


def default_num_splits(batch: int, kv_heads: int, max_context: int | None = None,
                       block_size: int = 16) -> int:
    """Enough programs to fill the GPU (2 waves of SMs), at most 16 splits; independent of
    context length unless ``max_context`` is given (then never more splits than 512-token
    chunks of context)."""
    sms = _sm_count()
    splits = max(1, min(16, -(-2 * sms // max(1, batch * kv_heads))))
    if max_context is not None:
        splits = max(1, min(splits, -(-max_context // max(512, block_size))))
    return splits


@dataclass(frozen=True)
class Launch:
    """One planned kernel launch: the launchers build these and ``run`` them, and
    ``benchmarks/compile_report.py`` compiles them, with the argument types read off the very
    arguments the launcher passes (``signature``)."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    maxnreg: int | None

    def run(self) -> None:
        self.kernel[self.grid](*self.args, num_warps=self.num_warps,
                               num_stages=self.num_stages, maxnreg=self.maxnreg,
                               **self.constexprs)

    def signature(self) -> dict[str, str]:
        """Argument name -> Triton type (``*fp32``, ``i32``, ``constexpr``...)."""
        names = [n for n in self.kernel.arg_names if n not in self.constexprs]
        sig = {n: _triton_type(a) for n, a in zip(names, self.args, strict=True)}
        return {**sig, **{n: "constexpr" for n in self.constexprs}}


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def _triton_type(arg) -> str:
    if isinstance(arg, torch.Tensor):
        return "*" + _TRITON_DTYPES[arg.dtype]
    if isinstance(arg, float):
        return "fp32"
    return "i32"  # sizes, strides and counts (all below 2**31)


def launch(kernel, grid, args: tuple, config: tuple) -> Launch:
    """A Launch from a tuning function's (constexprs, num_warps, num_stages, maxnreg)."""
    constexprs, warps, stages, maxnreg = config
    return Launch(kernel, tuple(grid), tuple(args), constexprs, warps, stages, maxnreg)


def run(launches: list[Launch]) -> None:
    for one in launches:
        one.run()
