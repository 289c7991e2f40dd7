"""Kernel pieces of QJL key sketches (reference: ``vllm_kvq.formats.qjl``).

``qjl_key_scores`` <-> ``QJLKeyCodec.scores``: norm * <c S q, signs> + the exact outliers
``store_qjl``      <-> ``QJLKeyCodec.encode``: outliers, norm, sign bits of S k_in
"""

import triton
import triton.language as tl

from vllm_kvq.formats.qjl import QJL

from ..bits import pack, store_f16_bytes, unpack

KIND = tl.constexpr(QJL.kernel_kind)


@triton.jit
def qjl_key_scores(u8_ptr, h_ptr, slot, valid, qs, qraw_ptr, qrow, row_valid, D: tl.constexpr,
                   QJL_M: tl.constexpr, QJL_O: tl.constexpr, QJL_OP: tl.constexpr,
                   K_SPLIT: tl.constexpr, N: tl.constexpr):
    """Estimated <q, k> of N sketched keys: fp32 ``[N, MP]``. qs: sqrt(pi/2)/m * S q
    (per bit position when K_SPLIT); qraw_ptr / qrow locate the raw query rows, which the
    exact outlier channels read, gathered by each token's outlier indices."""
    x = tl.load(u8_ptr + slot[:, None] + tl.arange(0, QJL_M // 8)[None, :],  # stream: bulk
                mask=valid[:, None], other=0)
    if K_SPLIT:
        xi = x.to(tl.int32)
        s = tl.dot(((xi & 1) * 2 - 1).to(tl.float16), qs[0])
        for sh in tl.static_range(1, 8):
            s += tl.dot((((xi >> sh) & 1) * 2 - 1).to(tl.float16), qs[sh])
    else:
        signs = (unpack(x, 1, N, QJL_M // 8) * 2 - 1).to(tl.float16)  # [N, m]
        s = tl.dot(signs, qs[0])
    norm = tl.load(h_ptr + slot // 2 + QJL_M // 16, mask=valid,  # stream: side
                   other=0.0).to(tl.float32)
    s = s * norm[:, None]
    if QJL_O > 0:  # exact outlier channels: s += sum_j val_j * q[row, idx_j]
        jo = tl.arange(0, QJL_OP)
        om = valid[:, None] & (jo < QJL_O)[None, :]
        vals = tl.load(h_ptr + (slot // 2 + QJL_M // 16 + 1)[:, None]  # stream: side
                       + jo[None, :], mask=om, other=0.0).to(tl.float32)  # [N, OP]
        idx = tl.load(u8_ptr + (slot + QJL_M // 8 + 2 + 2 * QJL_O)[:, None]  # stream: side
                      + jo[None, :], mask=om, other=0).to(tl.int32)
        idx = tl.minimum(idx, D - 1)  # unwritten slots hold any byte
        qg = tl.load(qraw_ptr + qrow[None, None, :] + idx[:, :, None],
                     mask=om[:, :, None] & row_valid[None, None, :], other=0.0)
        s += tl.sum(qg.to(tl.float32) * vals[:, :, None], axis=1)
    return s


@triton.jit
def store_qjl(u8_ptr, base, ok, x_ptr, xrow, proj_ptr, h, M: tl.constexpr, O: tl.constexpr,
              OP: tl.constexpr, D: tl.constexpr, MC: tl.constexpr, KC: tl.constexpr,
              BT: tl.constexpr):
    """QJLKeyCodec.encode: outliers (top-O |k|, ascending index), norm, sign bits. The sketch
    S k_in is accumulated over KC-channel slices of k (tf32x3 dots) with the outlier channels
    zeroed slice by slice."""
    d = tl.arange(0, D)
    x = tl.load(x_ptr + xrow[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    jo = tl.arange(0, OP)
    out_idx = tl.full([BT, OP], -1, tl.int32)  # outlier channels, ascending; -1 = none
    if O > 0:
        a = tl.abs(x)
        sel = tl.zeros([BT, D], tl.int32)
        for _ in tl.static_range(O):
            am = tl.where(sel != 0, -1.0, a)
            top = tl.argmax(am, axis=1)
            sel = tl.where(d[None, :] == top[:, None], 1, sel)
        rank = tl.cumsum(sel, axis=1) - 1
        smask = ok[:, None] & (sel != 0)
        idx_b = tl.broadcast_to(d[None, :], [BT, D]).to(tl.uint8)
        tl.store(u8_ptr + base[:, None] + M // 8 + 2 + 2 * O + rank, idx_b, mask=smask)
        store_f16_bytes(u8_ptr, base[:, None] + M // 8 + 2 + 2 * rank, x, smask)
        for k in tl.static_range(O):
            hit = (sel != 0) & (rank == k)
            idx_k = tl.max(tl.where(hit, d[None, :], -1), axis=1)
            out_idx = tl.where(jo[None, :] == k, idx_k[:, None], out_idx)
        x = tl.where(sel != 0, 0.0, x)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    store_f16_bytes(u8_ptr, base + M // 8, norm, ok)
    mc = tl.arange(0, MC)
    kk = tl.arange(0, KC)
    jb = tl.arange(0, MC // 8)
    for c in range(M // MC):
        sk = tl.zeros([BT, MC], tl.float32)
        for k0 in range(0, D, KC):
            xk = tl.load(x_ptr + xrow[:, None] + (k0 + kk)[None, :], mask=ok[:, None],
                         other=0.0).to(tl.float32)
            is_out = tl.max((out_idx[:, :, None] == (k0 + kk)[None, None, :]).to(tl.int32),
                            axis=1)
            xk = tl.where(is_out != 0, 0.0, xk)
            st = tl.load(proj_ptr + h.to(tl.int64) * M * D + (c * MC + mc)[None, :] * D
                         + (k0 + kk)[:, None])  # [KC, MC] = S[chunk, k-slice]^T
            sk += tl.dot(xk, st, input_precision="tf32x3")
        bits = pack((sk >= 0).to(tl.int32), 1, BT, MC)
        tl.store(u8_ptr + base[:, None] + c * (MC // 8) + jb[None, :], bits, mask=ok[:, None])
