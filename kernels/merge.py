"""Log-sum-exp merge of the split-K context partials, un-rotation, the exact recent window
and the exact fresh tokens.

One program per (query tile, KV head). It merges the ``NUM_SPLITS`` partials of
``kernels.context`` (base-2 running max / sum / un-normalized accumulator in the value
codec's domain), maps the accumulator back to model space once (``acc @ R`` for rotated
values, K-chunked so R never has to fit in registers), then continues the same online
softmax over exact keys and values in model space (so no exact value is ever rotated):

- with ``WINDOW``, the request's exact recent window (``vllm_kvq.window``): tokens
  ``[first, first + exact)`` read straight from the per-layer ring ``[slots, R, H, D]``
  (position p at ring index p % R of the request's slot; ``first`` = the packed context
  length), fully visible to every query row, since they precede every fresh token;
- the step's own fresh tokens, read exactly from the model's K/V (past-only quantization:
  a token never sees its own K/V through the quantizer), causal within the chunk,

and writes the normalized output. The window is read once per (query tile, KV head), like
the fresh tokens; it is not split (the splits cover the packed context only).
"""

import triton
import triton.language as tl

from .bits import dot16
from .context import NEG


@triton.jit
def exact_update(q, k, v, visible, m_run, l_run, acc, SCALE, UPCAST: tl.constexpr):
    """One online-softmax step over a tile of exact keys / values ``[BLOCK_F, D]`` (model
    dtype) for query rows ``q`` ``[MP, D]``; visible ``[MP, BLOCK_F]``. Returns the new
    (running max, sum, accumulator)."""
    sc = dot16(q, tl.trans(k.to(q.dtype)), UPCAST) * SCALE
    sc = tl.where(visible, sc, float("-inf"))
    m_new = tl.maximum(m_run, tl.max(sc, axis=1))
    alpha = tl.exp2(m_run - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_run = l_run * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot16(p.to(v.dtype), v, UPCAST)
    return m_new, l_run, acc


@triton.jit(do_not_specialize=["NUM_SPLITS", "NT", "H", "GQA", "BLOCK_Q", "RING"])
def merge_fresh_kernel(
        part_acc_ptr, part_ml_ptr, NUM_SPLITS,
        q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, rot_ptr,
        out_ptr, so_t, so_h,
        tile_req_ptr, tile_tok_ptr, tile_ntok_ptr, tile_pos0_ptr, req_qstart_ptr,
        lim_ptr, req_start_ptr, first_ptr,
        ring_k_ptr, ring_v_ptr, sw_slot, sw_idx, sw_h, RING,
        win_slot_ptr, win_first_ptr, win_exact_ptr,
        NT, H, GQA, BLOCK_Q, SCALE,
        D: tl.constexpr, V_ROT: tl.constexpr, MP: tl.constexpr, BLOCK_F: tl.constexpr,
        BK: tl.constexpr, IS_DECODE: tl.constexpr, WINDOW: tl.constexpr,
        ROW_LIMITS: tl.constexpr, FIRST_KEYS: tl.constexpr, UPCAST: tl.constexpr):
    """Ring (WINDOW only): ``ring_k``/``ring_v`` in the model dtype with element strides
    (sw_slot, sw_idx, sw_h) and RING entries per slot; per request its slot
    (``win_slot``, -1: none), the position of its first window token (``win_first``, the
    packed context length) and the number of window tokens (``win_exact``, 0: none).
    ROW_LIMITS (prefill): token t reads exactly only the keys from position ``lim[t]`` on
    (``req_start``: the position of each request's first chunk token); the earlier window
    entries and chunk tokens were read packed by the context kernel.
    FIRST_KEYS (a sliding window): token t sees no exact key before position ``first[t]``
    either (``req_start`` is then needed too)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if IS_DECODE:
        req = pid
        tok0 = pid
        ntok = 1
        pos0 = 0
        qstart = pid
    else:
        req = tl.load(tile_req_ptr + pid)
        tok0 = tl.load(tile_tok_ptr + pid)
        ntok = tl.load(tile_ntok_ptr + pid)
        pos0 = tl.load(tile_pos0_ptr + pid)
        qstart = tl.load(req_qstart_ptr + req)
    r = tl.arange(0, MP)
    t_loc = r // GQA
    row_valid = t_loc < ntok
    tok = (tok0 + t_loc).to(tl.int64)
    head = h * GQA + r % GQA
    d = tl.arange(0, D)

    # ---- log-sum-exp merge of the context splits --------------------------------------------
    hq = H * GQA
    base = tok * hq + head  # split 0 of each row's partials ([splits, tokens, heads, ...])
    rq = NT * hq  # distance between splits
    m_run = tl.full([MP], NEG, tl.float32)
    for s in range(NUM_SPLITS):
        m_s = tl.load(part_ml_ptr + (base + s * rq) * 2, mask=row_valid, other=NEG)
        m_run = tl.maximum(m_run, m_s)
    l_run = tl.zeros([MP], tl.float32)
    for s in range(NUM_SPLITS):
        m_s = tl.load(part_ml_ptr + (base + s * rq) * 2, mask=row_valid, other=NEG)
        l_s = tl.load(part_ml_ptr + (base + s * rq) * 2 + 1, mask=row_valid, other=0.0)
        l_run += tl.exp2(m_s - m_run) * l_s
    if V_ROT:
        # out = acc_codec @ R, with the K dimension (codec channels) in chunks of BK.
        acc = tl.zeros([MP, D], tl.float32)
        kk = tl.arange(0, BK)
        rot_h = rot_ptr + h.to(tl.int64) * D * D
        for c in range(0, D, BK):
            a = tl.zeros([MP, BK], tl.float32)
            for s in range(NUM_SPLITS):
                m_s = tl.load(part_ml_ptr + (base + s * rq) * 2, mask=row_valid, other=NEG)
                w = tl.exp2(m_s - m_run)
                a += w[:, None] * tl.load(part_acc_ptr + (base + s * rq)[:, None] * D + c
                                          + kk[None, :], mask=row_valid[:, None], other=0.0)
            rt = tl.load(rot_h + (c + kk)[:, None] * D + d[None, :])
            acc += tl.dot(a, rt, input_precision="tf32x3")
    else:
        acc = tl.zeros([MP, D], tl.float32)
        for s in range(NUM_SPLITS):
            m_s = tl.load(part_ml_ptr + (base + s * rq) * 2, mask=row_valid, other=NEG)
            w = tl.exp2(m_s - m_run)
            acc += w[:, None] * tl.load(part_acc_ptr + (base + s * rq)[:, None] * D + d[None, :],
                                        mask=row_valid[:, None], other=0.0)

    q = tl.load(q_ptr + (tok * sq_t + head * sq_h)[:, None] + d[None, :],
                mask=row_valid[:, None], other=0.0)
    pos = pos0 + t_loc  # position of each row's token inside its request's chunk
    # First exact key of each row, relative to its chunk's first token.
    exact_from = pos * 0 - (1 << 30)
    if ROW_LIMITS or FIRST_KEYS:
        chunk_start = tl.load(req_start_ptr + req)
    if ROW_LIMITS:
        exact_from = tl.load(lim_ptr + tok, mask=row_valid, other=0) - chunk_start
    if FIRST_KEYS:
        first = tl.load(first_ptr + tok, mask=row_valid, other=0) - chunk_start
        exact_from = tl.maximum(exact_from, first)
    f_off = tl.arange(0, BLOCK_F)

    # ---- the exact recent window, straight from the ring (visible to every row) ------------
    if WINDOW:
        w_slot = tl.load(win_slot_ptr + req)
        w_first = tl.load(win_first_ptr + req).to(tl.int64)
        n_win = tl.where(w_slot >= 0, tl.minimum(tl.load(win_exact_ptr + req), RING), 0)
        w_base = w_slot.to(tl.int64) * sw_slot + h * sw_h
        for w0 in range(0, n_win, BLOCK_F):
            w = w0 + f_off
            wm = w < n_win
            roff = w_base + ((w_first + w) % RING) * sw_idx  # position p at ring index p % R
            k = tl.load(ring_k_ptr + roff[:, None] + d[None, :], mask=wm[:, None], other=0.0)
            v = tl.load(ring_v_ptr + roff[:, None] + d[None, :], mask=wm[:, None], other=0.0)
            seen = wm[None, :] & ((w - n_win)[None, :] >= exact_from[:, None])
            m_run, l_run, acc = exact_update(q, k, v, seen, m_run, l_run, acc, SCALE, UPCAST)

    # ---- the step's own tokens, exact and causal ---------------------------------------------
    n_fresh = pos0 + ntok
    # Skip the fresh tiles no row reads exactly (with ROW_LIMITS, all but the last few).
    f_lo = tl.maximum(tl.min(tl.where(row_valid, exact_from, 1 << 30), axis=0), 0)
    for f0 in range(f_lo // BLOCK_F * BLOCK_F, n_fresh, BLOCK_F):
        f = f0 + f_off
        fm = f < n_fresh
        ft = (qstart + f).to(tl.int64)
        k = tl.load(k_ptr + (ft * sk_t + h * sk_h)[:, None] + d[None, :], mask=fm[:, None],
                    other=0.0)
        v = tl.load(v_ptr + (ft * sv_t + h * sv_h)[:, None] + d[None, :], mask=fm[:, None],
                    other=0.0)
        seen = (f[None, :] <= pos[:, None]) & (f[None, :] >= exact_from[:, None]) & fm[None, :]
        m_run, l_run, acc = exact_update(q, k, v, seen, m_run, l_run, acc, SCALE, UPCAST)

    out = acc / l_run[:, None]
    tl.store(out_ptr + (tok * so_t + head * so_h)[:, None] + d[None, :], out,
             mask=row_valid[:, None])
