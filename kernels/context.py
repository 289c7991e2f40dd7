"""Split-K attention of query tiles over the packed paged context (decode and prefill).

One program per (query tile, KV head, split). A query tile is every query head of one GQA
group for ``BLOCK_Q`` consecutive tokens of one request (decode: one token, so the tile is
the GQA group), so each packed block is read once per KV head and tile. The program walks
its split's share of the request's context in tiles of BLOCK_N tokens (each token looks up
its own physical block, so tiles may span blocks of any size; the number of splits is fixed
per launch and a split's share is derived from the context length on the device, so the
launch shape does not depend on it and can be captured in a CUDA graph). It scores every
stored key in-kernel from the packed bytes (see ``kernels.formats``: tokens on the M side of the
tensor-core dots, query rows on the N side), runs an online softmax (base 2) and accumulates
dequantized values in the value codec's domain (rotated values are never un-rotated per
token). It writes the un-normalized partial (acc, running max, running sum) for the merge
kernel (``kernels.merge``), which combines splits with a log-sum-exp merge, un-rotates once
and adds the step's own fresh tokens exactly.
"""

import triton
import triton.language as tl

from .formats import (KIVI, key_scores, load_queries, value_channels, value_rows, value_state,
                      value_update)

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (exp2 stays NaN-free)


@triton.jit(do_not_specialize=["bt_stride", "NT", "H", "GQA", "BLOCK_Q", "BS", "BS_M", "BS_S",
                                "NUM_SPLITS"])
def paged_context_kernel(
        qp_ptr, qr_ptr, sqr_t, sqr_h,
        u8_ptr, h_ptr, r_ptr, stride_blk, stride_head,
        bt_ptr, bt_stride, ctx_ptr, lim_ptr, first_ptr,
        tile_req_ptr, tile_tok_ptr, tile_ntok_ptr,
        part_acc_ptr, part_ml_ptr,
        NT, H, GQA, BLOCK_Q, BS, BS_M, BS_S, NUM_SPLITS, SCALE,
        D: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr, RAW_BF16: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
        K_CB: tl.constexpr, K_ROT: tl.constexpr, QJL_M: tl.constexpr, QJL_O: tl.constexpr,
        QJL_OP: tl.constexpr, V_KIND: tl.constexpr, V_BITS: tl.constexpr,
        V_GROUP: tl.constexpr, V_CB: tl.constexpr, V_ROT: tl.constexpr,
        V_CHUNK: tl.constexpr, V_A: tl.constexpr, V_DELTA: tl.constexpr, V_C0: tl.constexpr,
        K_FOLD: tl.constexpr, V_FOLD: tl.constexpr,
        K_SPLIT: tl.constexpr, QK: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr,
        IS_DECODE: tl.constexpr, ROW_LIMITS: tl.constexpr, FIRST_KEYS: tl.constexpr,
        UPCAST: tl.constexpr):
    """qp: prepared queries fp32 ``[T, Hq, QK]`` (R q, or c * S q for QJL, shift-major when
    K_SPLIT -- see api.prepare_queries; unused for raw keys); qr: the raw queries
    ``[T, Hq, D]`` (strides sqr_t, sqr_h). Cache strides are in bytes; tokens of one (block,
    head) are contiguous slots of SB bytes. BS_M, BS_S: ``launch.block_divisor(BS)``.
    K_FOLD / V_FOLD: ``launch.folds_keys`` / ``folds_values``.
    part_acc ``[NUM_SPLITS, NT, Hq, D]`` fp32 (codec domain, channel order) and part_ml
    ``[NUM_SPLITS, NT, Hq, 2]`` (running max in log2 units, sum), NT = query tokens: indexed
    by token and head, so the merge kernel may tile the queries differently.
    ROW_LIMITS (prefill): each query token t reads the packed keys ``[0, lim[t])`` (its own
    chunk's slots included; ``vllm_kvq.exactness``) instead of its request's ``ctx``.
    FIRST_KEYS (a sliding window): token t sees no key before position ``first[t]``; the
    tiles before the query tile's lowest first key are not read (vLLM may have freed their
    blocks), and no slot before it is loaded.
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if IS_DECODE:
        req = pid
        tok0 = pid
        ntok = 1
    else:
        req = tl.load(tile_req_ptr + pid)
        tok0 = tl.load(tile_tok_ptr + pid)
        ntok = tl.load(tile_ntok_ptr + pid)
    hq = H * GQA

    r = tl.arange(0, MP)
    t_loc = r // GQA
    row_valid = t_loc < ntok
    tok = (tok0 + t_loc).to(tl.int64)
    head = h * GQA + r % GQA
    qrow = tok * sqr_t + head * sqr_h  # raw query rows (element offsets)
    qs = load_queries(qp_ptr, qr_ptr, qrow, (tok * hq + head) * QK, row_valid, D, K_KIND,
                      K_BITS, K_GROUP, K_CB, K_SPLIT, K_FOLD, QK)

    # This split's share of the context, in whole tiles of BLOCK_N tokens. A tile may span
    # several (shuffled) blocks: every token looks up its own physical block.
    if ROW_LIMITS:  # limits never decrease along a request's chunk: the tile's last is its max
        row_lim = tl.load(lim_ptr + tok, mask=row_valid, other=0)
        ctx = tl.load(lim_ptr + tok0 + ntok - 1)
    else:
        row_lim = 0
        ctx = tl.load(ctx_ptr + req)
    n_tiles = tl.cdiv(ctx, BLOCK_N)
    if FIRST_KEYS:  # the splits share the tiles from the query tile's lowest first key on
        row_first = tl.load(first_ptr + tok, mask=row_valid, other=1 << 30)
        lowest = tl.min(row_first, axis=0)
        t_first = lowest // BLOCK_N
        per_split = tl.cdiv(tl.maximum(n_tiles - t_first, 0), NUM_SPLITS)
        t_lo = t_first + split * per_split
    else:
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)

    m_i = tl.full([MP], NEG, tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    acc, msum = value_state(D, MP, V_GROUP, V_FOLD)  # transposed: channels x query rows
    n_off = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + req.to(tl.int64) * bt_stride
    for it in range(t_lo, t_hi):
        pos = it * BLOCK_N + n_off
        valid = pos < ctx
        if FIRST_KEYS:  # slots before it may be freed: never loaded
            valid = valid & (pos >= lowest)
        blk = ((pos.to(tl.int64) * BS_M) >> BS_S).to(tl.int32)  # pos // BS (launch.block_divisor)
        phys = tl.load(bt_row + blk, mask=valid, other=0).to(tl.int64)
        slot = phys * stride_blk + h * stride_head + (pos - blk * BS).to(tl.int64) * SB
        if K_KIND == KIVI:  # KIVI keys: the tile's whole groups, each inside one block
            gpos = it * BLOCK_N + tl.arange(0, BLOCK_N // K_GROUP) * K_GROUP
            gblk = ((gpos.to(tl.int64) * BS_M) >> BS_S).to(tl.int32)
            gvalid = gpos < ctx
            gphys = tl.load(bt_row + gblk, mask=gvalid, other=0).to(tl.int64)
            gslot = gphys * stride_blk + h * stride_head + (gpos - gblk * BS).to(tl.int64) * SB
        else:
            gslot = 0
            gvalid = 0
        s = key_scores(u8_ptr, h_ptr, r_ptr, slot, gslot, gvalid, valid, qs, qr_ptr, qrow,
                       row_valid, D, SB, K_KIND, K_BITS, K_GROUP, K_CB, QJL_M, QJL_O, QJL_OP,
                       K_SPLIT, K_FOLD, BLOCK_N, UPCAST)  # [BLOCK_N, MP]
        seen = valid[:, None]
        if ROW_LIMITS:
            seen = seen & (pos[:, None] < row_lim[None, :])
        if FIRST_KEYS:
            seen = seen & (pos[:, None] >= row_first[None, :])
        s = tl.where(seen, s * SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc, msum = value_update(acc, msum, alpha, p, u8_ptr, h_ptr, r_ptr, slot, valid, D, KB,
                                 V_KIND, V_BITS, V_GROUP, V_CB, V_CHUNK, V_A, V_DELTA, V_FOLD,
                                 BLOCK_N, UPCAST)
        m_i = m_new

    base = (split * NT + tok) * hq + head  # partials are [splits, tokens, query heads, ...]
    ch = value_channels(D, V_BITS, V_CB, V_DELTA, V_C0, V_FOLD)
    tl.store(part_acc_ptr + base[None, :] * D + ch[:, None],
             value_rows(acc, msum, ch, D, V_GROUP, V_FOLD), mask=row_valid[None, :])
    tl.store(part_ml_ptr + base * 2, m_i, mask=row_valid)
    tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_valid)
