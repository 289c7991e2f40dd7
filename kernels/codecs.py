"""Triton device functions for the packed formats: bit (un)packing, field loads, scores.

Each function mirrors one piece of the torch reference in ``vllm_kvq.formats``:
  ``unpack``/``pack``      <-> ``formats.bits.unpack``/``pack`` (little-endian within a byte)
  ``int_tile``             <-> ``IntGroupCodec.decode`` (codes * scale + min, per group)
  ``key_scores``           <-> ``Codec.scores`` for raw / int / QJL / KIVI keys
  ``value_tile``           <-> ``Codec.decode`` of the value field (in the codec's domain)

Pointer conventions: ``u8_ptr``, ``h_ptr`` and ``r_ptr`` are the same KV-cache memory viewed
as uint8, float16 and the model's 16-bit dtype; ``slot`` is an int64 tensor of slot *byte*
offsets (always multiples of 16), so every field offset is an immediate and a field that
starts 16-byte aligned is read with 16-byte vector loads.
"""

import triton
import triton.language as tl


@triton.jit
def unpack(x, BITS: tl.constexpr, N: tl.constexpr, W: tl.constexpr):
    """uint8 ``[N, W]`` -> int32 codes ``[N, W * 8 // BITS]``; code i is byte i // (8 // BITS)
    at bit offset (i % (8 // BITS)) * BITS. Built with shifts and tl.join, so the codes of
    one byte stay in the thread that loaded it."""
    x = x.to(tl.int32)
    if BITS == 8:
        out = x
    elif BITS == 4:
        out = tl.reshape(tl.join(x & 15, x >> 4), [N, W * 2])
    elif BITS == 2:
        out = tl.reshape(tl.join(tl.join(x & 3, (x >> 4) & 3),
                                 tl.join((x >> 2) & 3, (x >> 6) & 3)), [N, W * 4])
    else:
        b0 = tl.join(tl.join(x & 1, (x >> 4) & 1), tl.join((x >> 2) & 1, (x >> 6) & 1))
        b1 = tl.join(tl.join((x >> 1) & 1, (x >> 5) & 1), tl.join((x >> 3) & 1, (x >> 7) & 1))
        out = tl.reshape(tl.join(b0, b1), [N, W * 8])
    return out


@triton.jit
def pack(codes, BITS: tl.constexpr, N: tl.constexpr, E: tl.constexpr):
    """int32 codes ``[N, E]`` (each < 2**BITS) -> uint8 bytes ``[N, E * BITS // 8]``."""
    if BITS == 8:
        out = codes.to(tl.uint8)
    else:
        PER: tl.constexpr = 8 // BITS
        c3 = tl.reshape(codes, [N, E // PER, PER])
        shifts = tl.arange(0, PER) * BITS
        out = tl.sum(c3 << shifts[None, None, :], axis=2).to(tl.uint8)
    return out


@triton.jit
def dot16(a, b, UPCAST: tl.constexpr):
    """``a @ b`` of 16-bit operands with fp32 accumulation. UPCAST multiplies in fp32 instead:
    set under TRITON_INTERPRET=1, whose dot sees bfloat16 storage as integers; exact for
    16-bit inputs either way."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def rint(x):
    """Round half to even (torch.round) for non-negative-ish fp32, exactly."""
    f = tl.floor(x)
    r = x - f
    up = (r > 0.5) | ((r == 0.5) & ((f.to(tl.int32) & 1) == 1))
    return f + up.to(tl.float32)


@triton.jit
def load_f16(u8_ptr, h_ptr, off, mask, EVEN: tl.constexpr):
    """fp16 values at byte offsets ``off`` -> fp32. EVEN: every offset is even (then one
    16-bit load each); otherwise the two bytes are loaded and combined."""
    if EVEN:
        v = tl.load(h_ptr + off // 2, mask=mask, other=0.0).to(tl.float32)  # stream: side
    else:
        lo = tl.load(u8_ptr + off, mask=mask, other=0).to(tl.int32)  # stream: side
        hi = tl.load(u8_ptr + off + 1, mask=mask, other=0).to(tl.int32)  # stream: side
        v = ((hi << 8) | lo).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def store_f16_bytes(u8_ptr, off, val, mask):
    """Store ``val`` rounded to fp16 as two bytes at (any) byte offsets ``off``."""
    bits = val.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(u8_ptr + off, (bits & 255).to(tl.uint8), mask=mask)
    tl.store(u8_ptr + off + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def load_window(u8_ptr, slot, valid, A: tl.constexpr, CB: tl.constexpr, CHUNK: tl.constexpr,
                DELTA: tl.constexpr, N: tl.constexpr):
    """The CB code bytes of a field starting at slot byte A + DELTA, as ``[N, CB]`` uint8.

    Read as the aligned window [A, A + CB) (16-byte vectors) plus, when DELTA > 0, the aligned
    CHUNK bytes after it, whose first DELTA bytes replace the window's DELTA leading bytes
    (they belong to the previous field). Byte j of the result is code byte (j - DELTA) mod CB.
    """
    j = tl.arange(0, CB)
    x = tl.load(u8_ptr + slot[:, None] + (A + j)[None, :], mask=valid[:, None],  # stream: bulk
                other=0)
    if DELTA > 0:
        NCH: tl.constexpr = CB // CHUNK
        jc = tl.arange(0, CHUNK)
        tail = tl.load(u8_ptr + slot[:, None] + (A + CB + jc)[None, :],  # stream: wrap
                       mask=valid[:, None], other=0)
        x3 = tl.reshape(x, [N, NCH, CHUNK])
        first = (tl.arange(0, NCH)[None, :, None] == 0) & (jc[None, None, :] < DELTA)
        x = tl.reshape(tl.where(first, tl.broadcast_to(tail[:, None, :], [N, NCH, CHUNK]), x3),
                       [N, CB])
    return x


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
def int_tile(u8_ptr, h_ptr, slot, valid, OFF: tl.constexpr, BITS: tl.constexpr,
             GROUP: tl.constexpr, D: tl.constexpr, CB: tl.constexpr, CHUNK: tl.constexpr,
             A: tl.constexpr, DELTA: tl.constexpr, N: tl.constexpr):
    """Whole-field dequantization (fields under 16 code bytes): fp16 ``[N, D]``; element e
    is channel (e - C0) mod D, C0 = DELTA * 8 / BITS."""
    x = load_window(u8_ptr, slot, valid, A, CB, CHUNK, DELTA, N)
    codes = unpack(x, BITS, N, CB).to(tl.float32)
    GR: tl.constexpr = D // GROUP
    sc, mn = group_affine(u8_ptr, h_ptr, slot, valid, OFF + CB, GR, GROUP, DELTA * 8 // BITS,
                          OFF % 2 == 0)
    return tl.reshape(tl.reshape(codes, [N, GR, GROUP]) * sc + mn, [N, D]).to(tl.float16)


@triton.jit
def raw_tile(u8_ptr, r_ptr, slot, valid, OFF: tl.constexpr, D: tl.constexpr,
             N: tl.constexpr):
    """The raw 16-bit field at slot offset OFF -> ``[N, D]`` in the model dtype."""
    d = tl.arange(0, D)
    if OFF % 2 == 0:
        v = tl.load(r_ptr + (slot // 2 + OFF // 2)[:, None] + d[None, :],  # stream: bulk
                    mask=valid[:, None], other=0.0)
    else:
        j = tl.arange(0, 2 * D)
        x = tl.load(u8_ptr + (slot + OFF)[:, None] + j[None, :],  # stream: bulk
                    mask=valid[:, None], other=0)
        lo, hi = tl.split(tl.reshape(x.to(tl.int32), [N, D, 2]))
        v = ((hi << 8) | lo).to(tl.int16).to(r_ptr.dtype.element_ty, bitcast=True)
    return v


# ---------------------------------------------------------------------------------------------
# Scores and values are computed transposed: tokens (and channels) on the M side of the
# tensor-core dots, query rows on the N side. Decode has only the GQA group's few query rows;
# as the N operand they need a tile of just 8 (instead of the 16-row minimum of the M side),
# every warp owns distinct tokens / channels (no replicated work), and each warp keeps a
# small [K, rows] query operand.
#
# Keys. Int codes and QJL sign bits are consumed per bit position ("shift"): piece s holds the
# codes at bit offset s * BITS of every byte, i.e. channels j * PER + s (PER = 8 // BITS). Each
# piece is as large as the loaded bytes, so a 16-byte load per thread never needs more than
# 16 dequantized values live per thread, and every piece feeds its own tensor-core dot
# against the matching strided piece of the (host-permuted, shift-major) query. Fields under
# 16 code bytes (too small for a dot) are unpacked whole instead.

@triton.jit
def load_queries(qp_ptr, qr_ptr, qrow, prow, row_valid, D: tl.constexpr, K_KIND: tl.constexpr,
                 K_BITS: tl.constexpr, K_CB: tl.constexpr, K_SPLIT: tl.constexpr,
                 QK: tl.constexpr):
    """The query operands of key_scores, loaded once per program, transposed: a tuple of
    ``[CB, MP]`` fp16 pieces (shift-major prepared queries), or ``([D or QK, MP],)``."""
    if K_KIND == 0:
        d = tl.arange(0, D)
        qs = (tl.load(qr_ptr + qrow[None, :] + d[:, None], mask=row_valid[None, :], other=0.0),)
    elif K_SPLIT:
        PER: tl.constexpr = 8 // K_BITS
        j = tl.arange(0, K_CB)
        qs = ()
        for s in tl.static_range(PER):
            qs = qs + (tl.load(qp_ptr + prow[None, :] + s * K_CB + j[:, None],
                               mask=row_valid[None, :], other=0.0).to(tl.float16),)
    else:
        jq = tl.arange(0, QK)
        qs = (tl.load(qp_ptr + prow[None, :] + jq[:, None], mask=row_valid[None, :],
                      other=0.0).to(tl.float16),)
    return qs


# KIVI keys (``KIVIKeyCodec``): per-channel codes over groups of G tokens; the group's fp16
# scales and mins (4*D bytes: scales of the D channels, then mins) are cut into G pieces of
# P = 4*D/G bytes, piece i in slot i of the group. A context tile holds NG = N / G whole
# groups (G divides the block size, so a group never spans two blocks), and a group's
# statistics fold into the query instead of the keys:
#     <q, k_n> = sum_c code[n, c] * (scale[c] * q[c]) + sum_c 1 * (min[c] * q[c])
# -- per bit position, a batched dot of the raw codes (exact in fp16) [NG, G, CB] with the
# per-group scaled query [NG, CB, MP], and one of ones with the min-weighted query (the
# per-group bias, without a cross-thread reduction). Dequantizing the keys instead would need
# D scales and mins per token (every thread holding the statistics of all of its channels);
# scaling the query touches only the small [NG, CB, MP] operands. The statistics are read
# as whole pieces (vector loads), once per tile.

@triton.jit
def kivi_stats(h_ptr, gslot, gvalid, KOFF: tl.constexpr, P: tl.constexpr, SB: tl.constexpr,
               G: tl.constexpr, D: tl.constexpr, PER: tl.constexpr):
    """fp16 scales and mins of the tile's groups (first slots ``gslot`` ``[NG]``, 0 where
    not ``gvalid``), each ``[NG, D // PER, PER]`` (channel order). The group's scales are the
    pieces of its first G/2 slots, its mins those of the last G/2 (P bytes at slot byte
    KOFF each): whole pieces, read with vector loads. A group read even partly has all of its
    slots packed."""
    i = tl.arange(0, G // 2)
    e = tl.arange(0, P // 2)
    off = (gslot // 2 + KOFF // 2)[:, None, None] + (i * (SB // 2))[None, :, None] \
        + e[None, None, :]
    m = gvalid[:, None, None]
    NG: tl.constexpr = gslot.shape[0]
    sc = tl.load(h_ptr + off, mask=m, other=0.0)  # stream: side
    mn = tl.load(h_ptr + off + G // 2 * (SB // 2), mask=m, other=0.0)  # stream: side
    return (tl.reshape(sc, [NG, D // PER, PER]), tl.reshape(mn, [NG, D // PER, PER]))


@triton.jit
def kivi_piece(codes, sc3, mn3, q, s, sh: tl.constexpr, NG: tl.constexpr, G: tl.constexpr):
    """Bit position ``sh`` (or the whole field): codes fp16 ``[N, C]`` (channels
    j * PER + sh), statistics fp16 ``[NG, C, PER]``, query fp16 ``[C, MP]``. Accumulates the
    scores ``[NG, G, MP]`` (fp32): codes . (scale * q) + min . q. Products of two fp16 values
    are rounded once to fp16, as an fp32 multiply then rounding would be."""
    C: tl.constexpr = codes.shape[1]
    PER: tl.constexpr = sc3.shape[2]
    pick = (tl.arange(0, PER) == sh)[None, None, :]
    sc = tl.sum(tl.where(pick, sc3, 0.0), axis=2).to(tl.float16)  # [NG, C]
    mn = tl.sum(tl.where(pick, mn3, 0.0), axis=2).to(tl.float16)
    s = tl.dot(tl.reshape(codes, [NG, G, C]), sc[:, :, None] * q[None, :, :], acc=s)
    return tl.dot(tl.full([NG, G, C], 1.0, tl.float16), mn[:, :, None] * q[None, :, :], acc=s)


@triton.jit
def kivi_scores(u8_ptr, h_ptr, slot, gslot, gvalid, valid, qs, D: tl.constexpr,
                BITS: tl.constexpr, G: tl.constexpr, CB: tl.constexpr, SPLIT: tl.constexpr,
                SB: tl.constexpr, N: tl.constexpr):
    """Unscaled <q, k> of N tokens = NG whole KIVI groups (first slots ``gslot`` ``[NG]``,
    groups past the context masked by ``gvalid``): fp32 ``[N, MP]``. Codes are consumed per
    bit position (SPLIT, as for int keys: piece s holds channels j * PER + s and meets query
    piece qs[s]) or unpacked whole (fields under 16 code bytes)."""
    P: tl.constexpr = 4 * D // G
    NG: tl.constexpr = N // G
    LEVELS: tl.constexpr = (1 << BITS) - 1
    MP: tl.constexpr = qs[0].shape[1]
    s = tl.zeros([NG, G, MP], tl.float32)
    if SPLIT:
        PER: tl.constexpr = 8 // BITS
        x = load_window(u8_ptr, slot, valid, 0, CB, 16, 0, N).to(tl.int32)
        sc3, mn3 = kivi_stats(h_ptr, gslot, gvalid, CB, P, SB, G, D, PER)
        for sh in tl.static_range(PER):
            s = kivi_piece(((x >> (sh * BITS)) & LEVELS).to(tl.float16), sc3, mn3, qs[sh], s,
                           sh, NG, G)
    else:
        x = load_window(u8_ptr, slot, valid, 0, CB, 16, 0, N)
        codes = unpack(x, BITS, N, CB).to(tl.float16)  # [N, D], channel order
        sc3, mn3 = kivi_stats(h_ptr, gslot, gvalid, CB, P, SB, G, D, 1)
        s = kivi_piece(codes, sc3, mn3, qs[0], s, 0, NG, G)
    return tl.reshape(s, [N, MP])


@triton.jit
def key_scores(u8_ptr, h_ptr, r_ptr, slot, gslot, gvalid, valid, qs, qraw_ptr, qrow,
               row_valid, D: tl.constexpr, SB: tl.constexpr, K_KIND: tl.constexpr,
               K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_CB: tl.constexpr,
               QJL_M: tl.constexpr, QJL_O: tl.constexpr, QJL_OP: tl.constexpr,
               K_SPLIT: tl.constexpr, N: tl.constexpr, UPCAST: tl.constexpr):
    """Unscaled <q, k> of every stored key and query row: fp32 ``[N, MP]``.

    qs (from load_queries): raw keys: the query in the model dtype; int keys: the (rotated)
    query; KIVI keys: the query; QJL keys: sqrt(pi/2)/m * S q. qraw_ptr/qrow locate the raw
    query rows (QJL outlier channels use the exact query, gathered by each token's outlier
    indices). gslot / gvalid: KIVI keys only, the first slot of each of the tile's groups
    ``[NG]`` and whether the group starts inside the context.
    """
    if K_KIND == 0:
        k = raw_tile(u8_ptr, r_ptr, slot, valid, 0, D, N)
        s = dot16(k, qs[0], UPCAST)
    elif K_KIND == 1:
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
    elif K_KIND == 3:
        s = kivi_scores(u8_ptr, h_ptr, slot, gslot, gvalid, valid, qs, D, K_BITS, K_GROUP, K_CB,
                        K_SPLIT, SB, N)
    else:
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


# ---------------------------------------------------------------------------------------------
# Values: the whole tile is dequantized (join-based unpack) so P @ V is one dot, transposed:
# acc^T [D, MP] += V^T [D, N] @ P^T [N, MP].

@triton.jit
def value_update(acc, alpha, p, u8_ptr, h_ptr, r_ptr, slot, valid, D: tl.constexpr,
                 KB: tl.constexpr, V_KIND: tl.constexpr, V_BITS: tl.constexpr,
                 V_GROUP: tl.constexpr, V_CB: tl.constexpr, V_CHUNK: tl.constexpr,
                 V_A: tl.constexpr, V_DELTA: tl.constexpr, N: tl.constexpr,
                 UPCAST: tl.constexpr):
    """acc * alpha + (P @ V)^T for the stored values of this tile: acc ``[D, MP]``, p
    ``[N, MP]``, alpha ``[MP]`` (codec domain; row e of acc is channel (e - V_C0) mod D)."""
    if V_KIND == 0:
        v = raw_tile(u8_ptr, r_ptr, slot, valid, KB, D, N)
        out = acc * alpha[None, :] + dot16(tl.trans(v), p.to(v.dtype), UPCAST)
    else:
        v = int_tile(u8_ptr, h_ptr, slot, valid, KB, V_BITS, V_GROUP, D, V_CB, V_CHUNK, V_A,
                     V_DELTA, N)
        out = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(tl.float16))
    return out
