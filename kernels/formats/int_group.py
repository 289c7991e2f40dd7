"""Kernel pieces of per-token integer codes (reference: ``vllm_kvq.formats.int_group``).

``group_affine`` / ``int_piece`` / ``int_tile`` <-> ``IntGroupCodec.decode`` (codes * scale +
min per group: per bit position, or the whole field); ``unpack3`` <-> ``formats.bits.unpack``
of 3-bit codes (two planes); ``int_key_scores`` <-> ``Codec.scores``
(the reference decodes, then multiplies by the prepared query R q); ``store_int`` <->
``IntGroupCodec.encode`` (rotation, min/max or centroid levels, fp16 statistics, codes).
Folded reads (``kernels.launch.folds_keys`` / ``folds_values``): ``word_codes`` /
``word_values`` / ``offset_codes`` <-> ``formats.bits.unpack`` (codes as exact fp16, no
conversion instruction); ``int_key_scores`` (K_FOLD) and ``int_value_update`` /
``int_value_rows`` <-> ``IntGroupCodec.decode`` with the scale applied outside the dot.
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
def offset_codes(x, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The codes at bit offset SHIFT of every byte of ``x`` (uint8) as exact fp16, without a
    conversion instruction: 0x6400 is 1024.0 in fp16, whose ulp is 1, so or-ing a code under
    1024 into its mantissa spells 1024 + code exactly (the magic-number conversion); one
    subtraction of 1024 (exact) leaves the code."""
    c = ((x >> SHIFT) & ((1 << BITS) - 1)).to(tl.int16)
    return (c | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def word_codes(w, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The codes at bit offset SHIFT of every byte of the int32 words ``w`` ``[N, W]`` as
    exact fp16 ``[N, 4 * W]``, in the byte order (0, 2, 1, 3) of each word: two codes per
    word operation, each pair already the two fp16 halves of one register (the layout of
    the tensor-core operands), no per-byte extraction."""
    M2: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    a = ((w >> SHIFT) & M2) | 0x64006400  # bytes 0 and 2
    b = ((w >> (SHIFT + 8)) & M2) | 0x64006400  # bytes 1 and 3
    ab = tl.join(a, b)  # [N, W, 2]
    halves = tl.join(ab.to(tl.int16), (ab >> 16).to(tl.int16))  # [N, W, 2, 2]
    N: tl.constexpr = w.shape[0]
    W: tl.constexpr = w.shape[1]
    return tl.reshape(halves, [N, 4 * W]).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def key_words(BITS: tl.constexpr, GROUP: tl.constexpr):
    """Whether int keys are read as int32 words (word_codes): a group's code bytes fill
    whole words, so the (0, 2, 1, 3) byte order within a word never crosses a group."""
    return (GROUP * BITS // 8) % 4 == 0


@triton.jit
def word_window(u8_ptr, slot, valid, A: tl.constexpr, CB: tl.constexpr, CHUNK: tl.constexpr,
                DELTA: tl.constexpr, N: tl.constexpr):
    """``load_window`` in int32 words: ``[N, CB / 4]``, word i is code word
    (i - DELTA / 4) mod (CB / 4) (fields start at multiples of 4 bytes). Its own address
    arithmetic on purpose: written as load_window on an int32 view (offsets / 4), ptxas spills
    8 bytes in k8v4's D64 decode on sm_80 (compile report, 2026-12-06)."""
    W: tl.constexpr = CB // 4
    p32 = u8_ptr.to(tl.pointer_type(tl.int32))
    j = tl.arange(0, W)
    w = tl.load(p32 + ((slot + A) // 4)[:, None] + j[None, :], mask=valid[:, None],  # stream: bulk
                other=0)
    if DELTA > 0:
        CW: tl.constexpr = CHUNK // 4
        NCH: tl.constexpr = W // CW
        jc = tl.arange(0, CW)
        tail = tl.load(p32 + ((slot + A + CB) // 4)[:, None] + jc[None, :],  # stream: wrap
                       mask=valid[:, None], other=0)
        w3 = tl.reshape(w, [N, NCH, CW])
        first = (tl.arange(0, NCH)[None, :, None] == 0) & (jc[None, None, :] < DELTA // 4)
        w = tl.reshape(tl.where(first, tl.broadcast_to(tail[:, None, :], [N, NCH, CW]), w3),
                       [N, W])
    return w


@triton.jit
def word_values(w, BITS: tl.constexpr):
    """Every code of the int32 words ``w`` ``[N, W]`` as exact fp16 ``[N, 32 * W / BITS]``:
    the bit positions' word_codes, joined (element order: folded_value_channels)."""
    p = word_codes(w, 0, BITS)
    if BITS <= 4:
        p = tl.join(p, word_codes(w, BITS, BITS))
    if BITS <= 2:
        p = tl.join(p, tl.join(word_codes(w, 2 * BITS, BITS), word_codes(w, 3 * BITS, BITS)))
    if BITS == 1:
        p = tl.join(p, tl.join(tl.join(word_codes(w, 4, 1), word_codes(w, 5, 1)),
                               tl.join(word_codes(w, 6, 1), word_codes(w, 7, 1))))
    N: tl.constexpr = w.shape[0]
    return tl.reshape(p, [N, w.shape[1] * 32 // BITS])


@triton.jit
def folded_value_channels(BITS: tl.constexpr, CB: tl.constexpr, DELTA: tl.constexpr,
                          D: tl.constexpr):
    """The codec-domain channel of every element of word_values(word_window(...)): ``[D]``.
    Element e is bit position s of window byte b: e = b' * PER + e', b' the byte's place in
    word order (0, 2, 1, 3), s from e' by the nesting of the joins (2 bits: 0 1 2 3 ->
    0 1 2 3 for two pieces, (p0, p1), (p2, p3) -> 0 2 1 3 ... see word_values)."""
    PER: tl.constexpr = 8 // BITS
    e = tl.arange(0, D)
    k = e % PER
    if PER == 4:
        s = (k % 2) * 2 + k // 2
    elif PER == 8:
        s = (k % 2) * 4 + ((k // 2) % 2) * 2 + k // 4
    else:
        s = k
    bp = e // PER
    byte = (bp // 4) * 4 + tl.where(bp % 4 == 1, 2, tl.where(bp % 4 == 2, 1, bp % 4))
    return ((byte - DELTA + CB) % CB) * PER + s


@triton.jit
def int_key_scores(u8_ptr, h_ptr, slot, valid, qs, D: tl.constexpr, K_BITS: tl.constexpr,
                   K_GROUP: tl.constexpr, K_CB: tl.constexpr, K_SPLIT: tl.constexpr,
                   K_FOLD: tl.constexpr, N: tl.constexpr):
    """Unscaled <q, k> of N int-coded keys and the (rotated) query pieces ``qs``: fp32
    ``[N, MP]``. Fields of >= 16 code bytes are consumed per bit position (K_SPLIT). With
    K_FOLD (launch.folds_keys) each group's scale is folded out of the dot:
        <q, k> = sum_g scale_g * <q_g, c_g> + min_g * sum(q_g)
    with qs the group-spread pieces and sums of load_queries, so the tensor cores multiply
    the exact fp16 codes themselves (word_codes / offset_codes: no conversion instruction,
    no per-element scale); otherwise each piece is dequantized before its dot. Smaller
    fields and 3-bit fields are dequantized whole."""
    GR: tl.constexpr = D // K_GROUP
    if K_FOLD:
        PER: tl.constexpr = 8 // K_BITS
        MP: tl.constexpr = qs[PER].shape[1]
        sc, mn = group_affine(u8_ptr, h_ptr, slot, valid, K_CB, GR, K_CB // GR, 0, True)
        if key_words(K_BITS, K_GROUP):
            jw = tl.arange(0, K_CB // 4)
            w = tl.load(u8_ptr.to(tl.pointer_type(tl.int32)) + (slot // 4)[:, None]  # stream: bulk
                        + jw[None, :], mask=valid[:, None], other=0)
            g = tl.dot(word_codes(w, 0, K_BITS), qs[0])  # [N, GR * MP]: a column block per group
            for sh in tl.static_range(1, PER):
                g = tl.dot(word_codes(w, sh * K_BITS, K_BITS), qs[sh], g)
        else:
            x = load_window(u8_ptr, slot, valid, 0, K_CB, 16, 0, N)
            g = tl.dot(offset_codes(x, 0, K_BITS), qs[0])
            for sh in tl.static_range(1, PER):
                g = tl.dot(offset_codes(x, sh * K_BITS, K_BITS), qs[sh], g)
        s = tl.sum(tl.reshape(g, [N, GR, MP]) * sc + mn * qs[PER][None, :, :], axis=1)
    elif K_SPLIT:
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
def int_value_update(acc, msum, alpha, p, u8_ptr, h_ptr, slot, valid, OFF: tl.constexpr,
                     BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                     CB: tl.constexpr, CHUNK: tl.constexpr, A: tl.constexpr,
                     DELTA: tl.constexpr, WORDS: tl.constexpr, N: tl.constexpr):
    """P @ V of int-coded values with each group's scale folded into the softmax weights:
        sum_t p_t v_t[e] = sum_t c_t[e] * (p_t * scale_t[g]) + sum_t p_t * min_t[g],
    g the group of element e. acc ``[D, GR * MP]`` (column block g: the codes of every
    element against the weights scaled by group g's scales; only element e's own block is
    kept, by int_value_rows) and msum ``[max(GR, 16), MP]`` (the min terms of group g in
    row g) are returned rescaled by
    alpha plus this tile. The codes reach the dot as exact fp16 integers without a
    conversion instruction (offset_codes)."""
    GR: tl.constexpr = D // GROUP
    MP: tl.constexpr = p.shape[1]
    if WORDS:  # element order: folded_value_channels
        c16 = word_values(word_window(u8_ptr, slot, valid, A, CB, CHUNK, DELTA, N), BITS)
    else:  # element e: channel (e - C0) mod D, as int_tile
        if BITS == 3:
            codes = unpack3(u8_ptr, slot, valid, OFF, D, N)
        else:
            codes = unpack(load_window(u8_ptr, slot, valid, A, CB, CHUNK, DELTA, N), BITS, N,
                           CB)
        c16 = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    g = tl.arange(0, GR)
    sc = load_f16(u8_ptr, h_ptr, slot[:, None] + OFF + CB + 2 * g[None, :], valid[:, None],
                  (OFF + CB) % 2 == 0)
    pe = tl.reshape(p[:, None, :] * sc[:, :, None], [N, GR * MP]).to(tl.float16)
    a = tl.reshape(tl.broadcast_to(alpha[None, :], [GR, MP]), [GR * MP])
    acc = tl.dot(tl.trans(c16), pe, acc * a[None, :])
    # The mins, transposed and padded to the 16 rows of a tensor-core tile: [16, N] fp16
    # (exact: they are stored as fp16).
    MR: tl.constexpr = 16 if GR < 16 else GR
    gm = tl.arange(0, MR)
    mn = load_f16(u8_ptr, h_ptr, slot[None, :] + OFF + CB + 2 * GR + 2 * gm[:, None],
                  valid[None, :] & (gm[:, None] < GR), (OFF + CB) % 2 == 0)
    msum = msum * alpha[None, :] + tl.dot(mn.to(tl.float16), p.to(tl.float16))
    return acc, msum


@triton.jit
def int_value_rows(acc, msum, ch, GROUP: tl.constexpr, D: tl.constexpr):
    """The folded accumulators of int_value_update -> ``[D, MP]``: row e (codec channel
    ``ch[e]``, group g) is column block g of acc plus the min terms of g."""
    GR: tl.constexpr = D // GROUP
    MP: tl.constexpr = msum.shape[1]
    g = ch // GROUP
    own = g[:, None, None] == tl.arange(0, GR)[None, :, None]
    rows = tl.sum(tl.where(own, tl.reshape(acc, [D, GR, MP]), 0.0), axis=1)
    mine = g[:, None] == tl.arange(0, msum.shape[0])[None, :]  # [D, rows of msum]
    return rows + tl.sum(tl.where(mine[:, :, None], msum[None, :, :], 0.0), axis=1)


@triton.jit
def group_query_pieces(q, GR: tl.constexpr):
    """A query piece ``[CB, MP]`` (code byte j, i.e. channel j * PER + s, is in group
    j // (CB / GR)) spread over GR column blocks, one per group, zero outside the group:
    ``[CB, GR * MP]`` fp16, so one dot yields every group's partial score."""
    CB: tl.constexpr = q.shape[0]
    MP: tl.constexpr = q.shape[1]
    own = (tl.arange(0, CB) // (CB // GR))[:, None, None] == tl.arange(0, GR)[None, :, None]
    return tl.reshape(tl.where(own, q[:, None, :], 0.0), [CB, GR * MP]).to(tl.float16)


@triton.jit
def group_query_sums(q, GR: tl.constexpr):
    """Per-group sums ``[GR, MP]`` fp32 of a query piece ``[CB, MP]`` (as group_query_pieces)."""
    CB: tl.constexpr = q.shape[0]
    MP: tl.constexpr = q.shape[1]
    return tl.sum(tl.reshape(q.to(tl.float32), [GR, CB // GR, MP]), axis=1)


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
