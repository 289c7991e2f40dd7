"""Per-format kernel pieces, and the dispatch the generic kernels call them through.

One module per storage format, beside its torch reference in ``vllm_kvq/formats/``:
``raw``, ``int_group``, ``qjl``, ``kivi``. Each names its kernel kind (``KIND``, the
``kernel_kind`` of the registered format class) and the reference function every device
function mirrors. The functions below switch on those named ``tl.constexpr`` kinds, so a
launch compiles only its own format's pieces.

Scores and values are computed transposed: tokens (and channels) on the M side of the
tensor-core dots, query rows on the N side. Decode has only the GQA group's few query rows;
as the N operand they need a tile of just 8 (instead of the 16-row minimum of the M side),
every warp owns distinct tokens / channels (no replicated work), and each warp keeps a small
[K, rows] query operand.

Keys. Int codes and QJL sign bits are consumed per bit position ("shift"): piece s holds the
codes at bit offset s * BITS of every byte, i.e. channels j * PER + s (PER = 8 // BITS). Each
piece is as large as the loaded bytes, so a 16-byte load per thread never needs more than 16
dequantized values live per thread, and every piece feeds its own tensor-core dot against the
matching strided piece of the (host-permuted, shift-major) query. Fields under 16 code bytes
(too small for a dot) are unpacked whole instead.

Values: the whole tile is dequantized (join-based unpack) so P @ V is one dot, transposed:
acc^T [D, MP] += V^T [D, N] @ P^T [N, MP].

Folded int codes (decode up to head size 128: ``kernels.launch.folds_keys`` /
``folds_values``): the dots take the raw codes as exact fp16 integers and each group's scale
is applied outside them -- to the per-group partial scores of group-spread query pieces
(keys), to the softmax weights (values, with the mins through one more dot); see
``int_group.int_key_scores`` / ``int_value_update``.
"""

import triton
import triton.language as tl

from ..bits import dot16
from .int_group import KIND as INT
from .int_group import (folded_value_channels, group_query_pieces, group_query_sums,
                        int_key_scores, int_tile, int_value_rows, int_value_update, key_words,
                        store_int)
from .kivi import KIND as KIVI
from .kivi import kivi_key_scores, store_kivi
from .qjl import KIND as QJL
from .qjl import qjl_key_scores, store_qjl
from .raw import KIND as RAW
from .raw import raw_tile, store_raw

# Kernel kinds with pieces here: a format with another kind runs on the torch path.
KINDS = {RAW.value: "raw", INT.value: "int", QJL.value: "qjl", KIVI.value: "kivi"}


@triton.jit
def load_queries(qp_ptr, qr_ptr, qrow, prow, row_valid, D: tl.constexpr, K_KIND: tl.constexpr,
                 K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_CB: tl.constexpr,
                 K_SPLIT: tl.constexpr, K_FOLD: tl.constexpr, QK: tl.constexpr):
    """The query operands of key_scores, loaded once per program, transposed: a tuple of
    ``[CB, MP]`` fp16 pieces (shift-major prepared queries), or ``([D or QK, MP],)``; with
    K_FOLD the pieces spread over the key groups (``[CB, GR * MP]``) and, last, the per-group
    sums of the fp16 query ``[GR, MP]`` (int_key_scores)."""
    if K_KIND == RAW:
        d = tl.arange(0, D)
        qs = (tl.load(qr_ptr + qrow[None, :] + d[:, None], mask=row_valid[None, :], other=0.0),)
    elif K_SPLIT:
        PER: tl.constexpr = 8 // K_BITS
        j = tl.arange(0, K_CB)
        if K_FOLD and key_words(K_BITS, K_GROUP):  # word_codes orders a word's bytes 0, 2, 1, 3
            j = j + ((j % 4 == 1).to(tl.int32) - (j % 4 == 2).to(tl.int32))
        qs = ()
        for s in tl.static_range(PER):
            qs = qs + (tl.load(qp_ptr + prow[None, :] + s * K_CB + j[:, None],
                               mask=row_valid[None, :], other=0.0).to(tl.float16),)
        if K_FOLD:
            GR: tl.constexpr = D // K_GROUP
            sums = group_query_sums(qs[0], GR)
            spread = (group_query_pieces(qs[0], GR),)
            for s in tl.static_range(1, PER):
                sums += group_query_sums(qs[s], GR)
                spread = spread + (group_query_pieces(qs[s], GR),)
            qs = spread + (sums,)
    else:
        jq = tl.arange(0, QK)
        qs = (tl.load(qp_ptr + prow[None, :] + jq[:, None], mask=row_valid[None, :],
                      other=0.0).to(tl.float16),)
    return qs


@triton.jit
def key_scores(u8_ptr, h_ptr, r_ptr, slot, gslot, gvalid, valid, qs, qraw_ptr, qrow,
               row_valid, D: tl.constexpr, SB: tl.constexpr, K_KIND: tl.constexpr,
               K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_CB: tl.constexpr,
               QJL_M: tl.constexpr, QJL_O: tl.constexpr, QJL_OP: tl.constexpr,
               K_SPLIT: tl.constexpr, K_FOLD: tl.constexpr, N: tl.constexpr,
               UPCAST: tl.constexpr):
    """Unscaled <q, k> of every stored key and query row: fp32 ``[N, MP]`` (``Codec.scores``).

    qs (from load_queries): raw keys: the query in the model dtype; int keys: the (rotated)
    query; KIVI keys: the query; QJL keys: sqrt(pi/2)/m * S q. qraw_ptr/qrow locate the raw
    query rows (QJL outliers). gslot / gvalid: KIVI keys only, the first slot of each of the
    tile's groups ``[NG]`` and whether the group starts inside the context.
    """
    if K_KIND == RAW:
        s = dot16(raw_tile(u8_ptr, r_ptr, slot, valid, 0, D, N), qs[0], UPCAST)
    elif K_KIND == INT:
        s = int_key_scores(u8_ptr, h_ptr, slot, valid, qs, D, K_BITS, K_GROUP, K_CB, K_SPLIT,
                           K_FOLD, N)
    elif K_KIND == KIVI:
        s = kivi_key_scores(u8_ptr, h_ptr, slot, gslot, gvalid, valid, qs, D, K_BITS, K_GROUP,
                            K_CB, K_SPLIT, SB, N)
    else:
        s = qjl_key_scores(u8_ptr, h_ptr, slot, valid, qs, qraw_ptr, qrow, row_valid, D, QJL_M,
                           QJL_O, QJL_OP, K_SPLIT, N)
    return s


@triton.jit
def value_state(D: tl.constexpr, MP: tl.constexpr, V_GROUP: tl.constexpr,
                V_FOLD: tl.constexpr):
    """Zero accumulators of value_update: ``[D, MP]`` (or ``[D, GR * MP]`` for folded int
    values) and the folded min terms ``[max(GR, 16), MP]`` (``[1, MP]``, unused, otherwise)."""
    if V_FOLD:
        GR: tl.constexpr = D // V_GROUP
        acc = tl.zeros([D, GR * MP], tl.float32)
        msum = tl.zeros([16 if GR < 16 else GR, MP], tl.float32)
    else:
        acc = tl.zeros([D, MP], tl.float32)
        msum = tl.zeros([1, MP], tl.float32)
    return acc, msum


@triton.jit
def value_update(acc, msum, alpha, p, u8_ptr, h_ptr, r_ptr, slot, valid, D: tl.constexpr,
                 KB: tl.constexpr, V_KIND: tl.constexpr, V_BITS: tl.constexpr,
                 V_GROUP: tl.constexpr, V_CB: tl.constexpr, V_CHUNK: tl.constexpr,
                 V_A: tl.constexpr, V_DELTA: tl.constexpr, V_FOLD: tl.constexpr,
                 N: tl.constexpr, UPCAST: tl.constexpr):
    """(acc, msum) rescaled by alpha ``[MP]`` plus (P @ V)^T of the stored values of this
    tile (``Codec.decode`` of the value field), p ``[N, MP]``: acc ``[D, MP]`` (codec
    domain; row e is channel (e - V_C0) mod D), or folded (V_FOLD, int_value_update)."""
    if V_FOLD:
        acc, msum = int_value_update(acc, msum, alpha, p, u8_ptr, h_ptr, slot, valid, KB,
                                     V_BITS, V_GROUP, D, V_CB, V_CHUNK, V_A, V_DELTA,
                                     V_FOLD == 2, N)
    elif V_KIND == RAW:
        v = raw_tile(u8_ptr, r_ptr, slot, valid, KB, D, N)
        acc = acc * alpha[None, :] + dot16(tl.trans(v), p.to(v.dtype), UPCAST)
    else:
        v = int_tile(u8_ptr, h_ptr, slot, valid, KB, V_BITS, V_GROUP, D, V_CB, V_CHUNK, V_A,
                     V_DELTA, N)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(tl.float16))
    return acc, msum


@triton.jit
def value_channels(D: tl.constexpr, V_BITS: tl.constexpr, V_CB: tl.constexpr,
                   V_DELTA: tl.constexpr, V_C0: tl.constexpr, V_FOLD: tl.constexpr):
    """The codec-domain channel of every row of value_update's accumulator: ``[D]``."""
    if V_FOLD == 2:  # launch.FOLD_WORDS
        ch = folded_value_channels(V_BITS, V_CB, V_DELTA, D)
    else:
        ch = (tl.arange(0, D) - V_C0 + D) % D  # row e is channel (e - C0) mod D
    return ch


@triton.jit
def value_rows(acc, msum, ch, D: tl.constexpr, V_GROUP: tl.constexpr, V_FOLD: tl.constexpr):
    """The ``[D, MP]`` partial P @ V of value_update's accumulators (row e: channel ch[e])."""
    if V_FOLD:
        out = int_value_rows(acc, msum, ch, V_GROUP, D)
    else:
        out = acc
    return out


@triton.jit
def store_field(u8_ptr, base, ok, x_ptr, xrow, mat_ptr, h, OFF: tl.constexpr,
                KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                CB: tl.constexpr, ROT: tl.constexpr, QJL_M: tl.constexpr,
                QJL_O: tl.constexpr, QJL_OP: tl.constexpr, RAW_BF16: tl.constexpr,
                D: tl.constexpr, CC: tl.constexpr, MC: tl.constexpr, KC: tl.constexpr,
                BT: tl.constexpr):
    """``Codec.encode`` of BT tokens (rows ``xrow`` of ``x_ptr``) into the field at slot byte
    OFF: mat_ptr is the format's per-head matrix (rotation or QJL projection)."""
    if KIND == RAW:
        d = tl.arange(0, D)
        x = tl.load(x_ptr + xrow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        store_raw(u8_ptr, base, ok, x, OFF, D, BT, RAW_BF16)
    elif KIND == INT:
        store_int(u8_ptr, base, ok, x_ptr, xrow, mat_ptr, h, OFF, BITS, GROUP, ROT, D, CC, KC,
                  BT)
    elif KIND == QJL:
        store_qjl(u8_ptr, base, ok, x_ptr, xrow, mat_ptr, h, QJL_M, QJL_O, QJL_OP, D, MC, KC, BT)
    else:
        store_kivi(u8_ptr, base, ok, D, GROUP, CB, BT)
