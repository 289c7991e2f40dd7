"""Kernel pieces of per-token integer codes (reference: ``vllm_kvq.formats.int_group``).

``group_affine`` / ``int_piece`` / ``int_tile`` <-> ``IntGroupCodec.decode`` (codes * scale +
min per group: per bit position, or the whole field); ``unpack3`` <-> ``formats.bits.unpack``
of 3-bit codes (two planes); ``int_key_scores`` <-> ``Codec.scores``
(the reference decodes, then multiplies by the prepared query R q); ``store_int`` <->
``IntGroupCodec.encode`` (rotation, min/max or centroid levels, fp16 statistics, codes).
"""

import triton
import triton.language as tl

from vllm_kvq.formats.int_group import IntGroup

from ..bits import load_f16, load_window, pack, rint, store_f16_bytes, unpack

KIND = tl.constexpr(IntGroup.kernel_kind)


@triton.jit
def group_affine(u8_ptr, h_ptr, slot, valid, SOFF: tl.constexpr, GR: tl.constexpr,
                 U: tl.constexpr, SHIFT: tl.constexpr, EVEN: tl.constexpr):
    """Per-group fp16 scale and min (at slot bytes SOFF and SOFF + 2*GR) for a tile whose
    columns come in chunks of U columns per group, rotated by SHIFT columns: column c of the
    tile belongs to group ((c - SHIFT) mod (GR*U)) // U. Returns (scale, min), each
    ``[N, GR, U]`` (or ``[N, GR, 1]`` when SHIFT is a multiple of U) for broadcasting."""
    Q: tl.constexpr = SHIFT // U
    R: tl.constexpr = SHIFT % U
    k = tl.arange(0, GR)
    g_hi = (k - Q + GR) % GR
    sm = valid[:, None]
    s_hi = load_f16(u8_ptr, h_ptr, slot[:, None] + SOFF + 2 * g_hi[None, :], sm, EVEN)
    m_hi = load_f16(u8_ptr, h_ptr, slot[:, None] + SOFF + 2 * GR + 2 * g_hi[None, :], sm, EVEN)
    if R > 0:
        g_lo = (k - Q - 1 + 2 * GR) % GR
        s_lo = load_f16(u8_ptr, h_ptr, slot[:, None] + SOFF + 2 * g_lo[None, :], sm, EVEN)
        m_lo = load_f16(u8_ptr, h_ptr, slot[:, None] + SOFF + 2 * GR + 2 * g_lo[None, :], sm,
                        EVEN)
        low = tl.arange(0, U)[None, None, :] < R
        sc = tl.where(low, s_lo[:, :, None], s_hi[:, :, None])
        mn = tl.where(low, m_lo[:, :, None], m_hi[:, :, None])
    else:
        sc = s_hi[:, :, None]
        mn = m_hi[:, :, None]
    return sc, mn


@triton.jit
def int_piece(x, sc, mn, s: tl.constexpr, BITS: tl.constexpr, GR: tl.constexpr,
              N: tl.constexpr, CB: tl.constexpr):
    """Dequantized codes at bit offset s * BITS of every byte of ``x`` ``[N, CB]``: fp16
    ``[N, CB]``; column j is channel j * (8 // BITS) + s of code byte j (group-wise affine)."""
    c = ((x.to(tl.int32) >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    return tl.reshape(tl.reshape(c, [N, GR, CB // GR]) * sc + mn, [N, CB]).to(tl.float16)


@triton.jit
def unpack3(u8_ptr, slot, valid, OFF: tl.constexpr, D: tl.constexpr, N: tl.constexpr):
    """The 3-bit codes of a field at slot byte OFF: int32 ``[N, D]`` in channel order, from
    the plane of low two bits (D/4 bytes) and the plane of high bits (D/8 bytes after it)."""
    jl = tl.arange(0, D // 4)
    jh = tl.arange(0, D // 8)
    lo = tl.load(u8_ptr + slot[:, None] + (OFF + jl)[None, :], mask=valid[:, None],  # stream: bulk
                 other=0)
    hi = tl.load(u8_ptr + slot[:, None] + (OFF + D // 4 + jh)[None, :],  # stream: bulk
                 mask=valid[:, None], other=0)
    return unpack(lo, 2, N, D // 4) | (unpack(hi, 1, N, D // 8) << 2)


@triton.jit
def int_tile(u8_ptr, h_ptr, slot, valid, OFF: tl.constexpr, BITS: tl.constexpr,
             GROUP: tl.constexpr, D: tl.constexpr, CB: tl.constexpr, CHUNK: tl.constexpr,
             A: tl.constexpr, DELTA: tl.constexpr, N: tl.constexpr):
    """Whole-field dequantization (fields under 16 code bytes, and 3-bit fields): fp16
    ``[N, D]``; element e is channel (e - C0) mod D, C0 = DELTA * 8 / BITS. 3-bit planes are
    read in place (their layout has DELTA = 0)."""
    GR: tl.constexpr = D // GROUP
    if BITS == 3:
        codes = unpack3(u8_ptr, slot, valid, OFF, D, N).to(tl.float32)
        sc, mn = group_affine(u8_ptr, h_ptr, slot, valid, OFF + CB, GR, GROUP, 0, OFF % 2 == 0)
    else:
        x = load_window(u8_ptr, slot, valid, A, CB, CHUNK, DELTA, N)
        codes = unpack(x, BITS, N, CB).to(tl.float32)
        sc, mn = group_affine(u8_ptr, h_ptr, slot, valid, OFF + CB, GR, GROUP,
                              DELTA * 8 // BITS, OFF % 2 == 0)
    return tl.reshape(tl.reshape(codes, [N, GR, GROUP]) * sc + mn, [N, D]).to(tl.float16)


@triton.jit
def int_key_scores(u8_ptr, h_ptr, slot, valid, qs, D: tl.constexpr, K_BITS: tl.constexpr,
                   K_GROUP: tl.constexpr, K_CB: tl.constexpr, K_SPLIT: tl.constexpr,
                   N: tl.constexpr):
    """Unscaled <q, k> of N int-coded keys and the (rotated) query pieces ``qs``: fp32
    ``[N, MP]``. Fields of >= 16 code bytes are consumed per bit position (one dot per
    piece), smaller ones and 3-bit fields dequantized whole."""
    GR: tl.constexpr = D // K_GROUP
    if K_SPLIT:
        x = load_window(u8_ptr, slot, valid, 0, K_CB, 16, 0, N)
        sc, mn = group_affine(u8_ptr, h_ptr, slot, valid, K_CB, GR, K_CB // GR, 0, True)
        s = tl.dot(int_piece(x, sc, mn, 0, K_BITS, GR, N, K_CB), qs[0])
        for sh in tl.static_range(1, 8 // K_BITS):
            s += tl.dot(int_piece(x, sc, mn, sh, K_BITS, GR, N, K_CB), qs[sh])
    else:
        k = int_tile(u8_ptr, h_ptr, slot, valid, 0, K_BITS, K_GROUP, D, K_CB, 16, 0, 0, N)
        s = tl.dot(k, qs[0])
    return s


@triton.jit
def store_int(u8_ptr, base, ok, x_ptr, xrow, rot_ptr, h, OFF: tl.constexpr,
              BITS: tl.constexpr, GROUP: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
              CC: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr):
    """IntGroupCodec.encode of BT tokens, CC channels (a multiple of GROUP) at a time. The
    rotation R x is accumulated over KC-channel slices of x (tf32x3 tensor-core dots, ~fp32
    accurate), so no operand ever holds a whole head."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = CC // GROUP
    GR: tl.constexpr = D // GROUP
    CB: tl.constexpr = D * BITS // 8
    cc = tl.arange(0, CC)
    kk = tl.arange(0, KC)
    gi = tl.arange(0, NG)
    for c in range(D // CC):
        if ROT:  # (R x)_i = sum_j R[i, j] x_j for the CC rows i of this chunk
            y = tl.zeros([BT, CC], tl.float32)
            for k0 in range(0, D, KC):
                xk = tl.load(x_ptr + xrow[:, None] + (k0 + kk)[None, :], mask=ok[:, None],
                             other=0.0).to(tl.float32)
                rt = tl.load(rot_ptr + h.to(tl.int64) * D * D + (c * CC + cc)[None, :] * D
                             + (k0 + kk)[:, None])  # [KC, CC] = R[chunk, k-slice]^T
                y += tl.dot(xk, rt, input_precision="tf32x3")
        else:
            y = tl.load(x_ptr + xrow[:, None] + (c * CC + cc)[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
        g = tl.reshape(y, [BT, NG, GROUP])
        lo = tl.min(g, axis=2)
        hi = tl.max(g, axis=2)
        if BITS == 1:  # the two centroids (IntGroupCodec.encode / two_level_centroids)
            up = g > ((lo + hi) * 0.5)[:, :, None]
            n_up = tl.sum(up.to(tl.float32), axis=2)
            low = tl.div_rn(tl.sum(tl.where(up, 0.0, g), axis=2),
                            tl.maximum(GROUP - n_up, 1.0))
            hi = tl.where(n_up > 0, tl.div_rn(tl.sum(tl.where(up, g, 0.0), axis=2),
                                              tl.maximum(n_up, 1.0)), low)
            lo = low
        scale16 = tl.div_rn(hi - lo, tl.full([BT, NG], LEVELS, tl.float32)).to(tl.float16)
        lo16 = lo.to(tl.float16)
        safe = tl.where(scale16 == 0, 1.0, scale16.to(tl.float32))
        q = tl.div_rn(g - lo16.to(tl.float32)[:, :, None], safe[:, :, None])
        codes = tl.minimum(tl.maximum(rint(q), 0.0), LEVELS * 1.0).to(tl.int32)
        codes = tl.reshape(codes, [BT, CC])
        if BITS == 3:  # two planes (formats.bits): low two bits, then the high bit
            jl = tl.arange(0, CC // 4)
            jh = tl.arange(0, CC // 8)
            tl.store(u8_ptr + base[:, None] + OFF + c * (CC // 4) + jl[None, :],
                     pack(codes & 3, 2, BT, CC), mask=ok[:, None])
            tl.store(u8_ptr + base[:, None] + OFF + D // 4 + c * (CC // 8) + jh[None, :],
                     pack(codes >> 2, 1, BT, CC), mask=ok[:, None])
        else:
            jb = tl.arange(0, CC * BITS // 8)
            tl.store(u8_ptr + base[:, None] + OFF + c * (CC * BITS // 8) + jb[None, :],
                     pack(codes, BITS, BT, CC), mask=ok[:, None])
        so = base[:, None] + OFF + CB + 2 * (c * NG + gi)[None, :]
        store_f16_bytes(u8_ptr, so, scale16.to(tl.float32), ok[:, None])
        store_f16_bytes(u8_ptr, so + 2 * GR, lo16.to(tl.float32), ok[:, None])
