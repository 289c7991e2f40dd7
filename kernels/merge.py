"""Log-sum-exp merge of the split-K context partials, un-rotation, and exact fresh tokens.

One program per (query tile, KV head). It merges the ``NUM_SPLITS`` partials of
``kernels.context`` (base-2 running max / sum / un-normalized accumulator in the value
codec's domain), maps the accumulator back to model space once (``acc @ R`` for rotated
values, K-chunked so R never has to fit in registers), then continues the same online
softmax over the step's own fresh tokens, read exactly from the model's K/V (past-only
quantization: a token never sees its own K/V through the quantizer), causal within the
chunk, and writes the normalized output.
"""

import triton
import triton.language as tl

from .codecs import dot16
from .context import NEG


@triton.jit(do_not_specialize=["NUM_SPLITS", "NT", "H", "GQA", "BLOCK_Q"])
def merge_fresh_kernel(
        part_acc_ptr, part_ml_ptr, NUM_SPLITS,
        q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, rot_ptr,
        out_ptr, so_t, so_h,
        tile_req_ptr, tile_tok_ptr, tile_ntok_ptr, tile_pos0_ptr, req_qstart_ptr,
        NT, H, GQA, BLOCK_Q, SCALE,
        D: tl.constexpr, V_ROT: tl.constexpr, MP: tl.constexpr, BLOCK_F: tl.constexpr,
        BK: tl.constexpr, IS_DECODE: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if IS_DECODE:
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

    # ---- the step's own tokens, exact and causal ---------------------------------------------
    q = tl.load(q_ptr + (tok * sq_t + head * sq_h)[:, None] + d[None, :],
                mask=row_valid[:, None], other=0.0)
    pos = pos0 + t_loc  # position of each row's token inside its request's chunk
    n_fresh = pos0 + ntok
    f_off = tl.arange(0, BLOCK_F)
    for f0 in range(0, n_fresh, BLOCK_F):
        f = f0 + f_off
        fm = f < n_fresh
        ft = (qstart + f).to(tl.int64)
        k = tl.load(k_ptr + (ft * sk_t + h * sk_h)[:, None] + d[None, :], mask=fm[:, None],
                    other=0.0)
        v = tl.load(v_ptr + (ft * sv_t + h * sv_h)[:, None] + d[None, :], mask=fm[:, None],
                    other=0.0)
        sc = dot16(q, tl.trans(k.to(q.dtype)), UPCAST) * SCALE
        sc = tl.where((f[None, :] <= pos[:, None]) & fm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(sc, axis=1))
        alpha = tl.exp2(m_run - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_run = l_run * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot16(p.to(v.dtype), v, UPCAST)
        m_run = m_new

    out = acc / l_run[:, None]
    tl.store(out_ptr + (tok * so_t + head * so_h)[:, None] + d[None, :], out,
             mask=row_valid[:, None])
