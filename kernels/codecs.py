"""Triton device functions for the packed formats: bit (un)packing, field loads, scores.

Each function mirrors one piece of the torch reference in ``vllm_kvq.formats``:
  ``unpack``/``pack``      <-> ``formats.bits.unpack``/``pack`` (little-endian within a byte)
  ``int_tile``             <-> ``IntGroupCodec.decode`` (codes * scale + min, per group)
  ``key_scores``           <-> ``Codec.scores`` for raw / int / QJL keys
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
def int_tile(u8_ptr, h_ptr, slot, valid, OFF: tl.constexpr, BITS: tl.constexpr,
             GROUP: tl.constexpr, D: tl.constexpr, CB: tl.constexpr, CHUNK: tl.constexpr,
             A: tl.constexpr, DELTA: tl.constexpr, N: tl.constexpr):
    """Dequantize the int field at slot offset OFF of N slots -> fp32 ``[N, D]``.

    Codes are read from the aligned window [A, A + CB) (A = OFF - DELTA) plus, when DELTA > 0,
    the aligned CHUNK bytes after it, which replace the DELTA leading bytes that belong to the
    previous field. Element e of the result is channel (e - C0) mod D, C0 = DELTA * 8 / BITS
    (C0 = 0 for aligned fields). Scales and mins follow the codes (fp16, D / GROUP each).
    """
    j = tl.arange(0, CB)
    x = tl.load(u8_ptr + slot[:, None] + (A + j)[None, :], mask=valid[:, None],  # stream: bulk
                other=0)
    if DELTA > 0:
        NCH: tl.constexpr = CB // CHUNK
        jc = tl.arange(0, CHUNK)
        tail = tl.load(u8_ptr + slot[:, None] + (A + CB + jc)[None, :],  # stream: bulk
                       mask=valid[:, None], other=0)
        x3 = tl.reshape(x, [N, NCH, CHUNK])
        first = (tl.arange(0, NCH)[None, :, None] == 0) & (jc[None, None, :] < DELTA)
        x = tl.reshape(tl.where(first, tl.broadcast_to(tail[:, None, :], [N, NCH, CHUNK]), x3),
                       [N, CB])
    codes = unpack(x, BITS, N, CB).to(tl.float32)
    GR: tl.constexpr = D // GROUP
    C0: tl.constexpr = DELTA * 8 // BITS
    Q: tl.constexpr = C0 // GROUP
    R: tl.constexpr = C0 % GROUP
    SOFF: tl.constexpr = OFF + CB
    MOFF: tl.constexpr = OFF + CB + 2 * GR
    EVEN: tl.constexpr = OFF % 2 == 0
    k = tl.arange(0, GR)
    g_hi = (k - Q + GR) % GR
    sm = valid[:, None]
    s_hi = load_f16(u8_ptr, h_ptr, slot[:, None] + SOFF + 2 * g_hi[None, :], sm, EVEN)
    m_hi = load_f16(u8_ptr, h_ptr, slot[:, None] + MOFF + 2 * g_hi[None, :], sm, EVEN)
    c3 = tl.reshape(codes, [N, GR, GROUP])
    if R > 0:
        g_lo = (k - Q - 1 + 2 * GR) % GR
        s_lo = load_f16(u8_ptr, h_ptr, slot[:, None] + SOFF + 2 * g_lo[None, :], sm, EVEN)
        m_lo = load_f16(u8_ptr, h_ptr, slot[:, None] + MOFF + 2 * g_lo[None, :], sm, EVEN)
        low = tl.arange(0, GROUP)[None, None, :] < R
        sc = tl.where(low, s_lo[:, :, None], s_hi[:, :, None])
        mn = tl.where(low, m_lo[:, :, None], m_hi[:, :, None])
        out = c3 * sc + mn
    else:
        out = c3 * s_hi[:, :, None] + m_hi[:, :, None]
    return tl.reshape(out, [N, D])


@triton.jit
def raw_tile(u8_ptr, r_ptr, slot, valid, OFF: tl.constexpr, D: tl.constexpr,
             N: tl.constexpr):
    """The raw 16-bit field at slot offset OFF -> ``[N, D]`` in the model dtype."""
    d = tl.arange(0, D)
    if OFF % 2 == 0:
        v = tl.load(r_ptr + (slot // 2 + OFF // 2)[:, None] + d[None, :],  # stream: bulk
                    mask=valid[:, None],
                    other=0.0)
    else:
        j = tl.arange(0, 2 * D)
        x = tl.load(u8_ptr + (slot + OFF)[:, None] + j[None, :],  # stream: bulk
                    mask=valid[:, None], other=0)
        lo, hi = tl.split(tl.reshape(x.to(tl.int32), [N, D, 2]))
        v = ((hi << 8) | lo).to(tl.int16).to(r_ptr.dtype.element_ty, bitcast=True)
    return v


@triton.jit
def key_scores(u8_ptr, h_ptr, r_ptr, slot, valid, qk, qraw_ptr, qrow, row_valid,
               D: tl.constexpr, K_KIND: tl.constexpr, K_BITS: tl.constexpr,
               K_GROUP: tl.constexpr, K_CB: tl.constexpr, QJL_M: tl.constexpr,
               QJL_O: tl.constexpr, QJL_OP: tl.constexpr, N: tl.constexpr,
               UPCAST: tl.constexpr):
    """Unscaled <q, k> of every query row and stored key: fp32 ``[MP, N]``.

    qk: raw keys: the query in the model dtype ``[MP, D]``; int keys: the (rotated) query as
    fp16 ``[MP, D]``; QJL keys: sqrt(pi/2)/m * S q as fp16 ``[MP, m]``. qraw_ptr/qrow locate
    the raw query rows (QJL outlier channels use the exact query).
    """
    if K_KIND == 0:
        k = raw_tile(u8_ptr, r_ptr, slot, valid, 0, D, N)
        s = dot16(qk, tl.trans(k), UPCAST)
    elif K_KIND == 1:
        k = int_tile(u8_ptr, h_ptr, slot, valid, 0, K_BITS, K_GROUP, D, K_CB, 16, 0, 0, N)
        s = tl.dot(qk, tl.trans(k.to(tl.float16)))
    else:
        j = tl.arange(0, QJL_M // 8)
        x = tl.load(u8_ptr + slot[:, None] + j[None, :], mask=valid[:, None],  # stream: bulk
                    other=0)
        signs = (unpack(x, 1, N, QJL_M // 8) * 2 - 1).to(tl.float16)  # [N, m]
        s = tl.dot(qk, tl.trans(signs))
        norm = tl.load(h_ptr + slot // 2 + QJL_M // 16, mask=valid,  # stream: side
                       other=0.0).to(tl.float32)
        s = s * norm[None, :]
        if QJL_O > 0:
            jo = tl.arange(0, QJL_OP)
            om = valid[:, None] & (jo < QJL_O)[None, :]
            vals = tl.load(h_ptr + (slot // 2 + QJL_M // 16 + 1)[:, None] + jo[None, :],  # stream: side
                           mask=om, other=0.0).to(tl.float32)  # [N, OP]
            idx = tl.load(u8_ptr + (slot + QJL_M // 8 + 2 + 2 * QJL_O)[:, None] + jo[None, :],  # stream: side
                          mask=om, other=0).to(tl.int32)
            idx = tl.minimum(idx, D - 1)  # unwritten slots hold any byte
            qg = tl.load(qraw_ptr + qrow[:, None, None] + idx[None, :, :],
                         mask=row_valid[:, None, None] & om[None, :, :], other=0.0)
            s += tl.sum(qg.to(tl.float32) * vals[None, :, :], axis=2)
    return s


@triton.jit
def value_tile(u8_ptr, h_ptr, r_ptr, slot, valid, D: tl.constexpr, KB: tl.constexpr,
               V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
               V_CB: tl.constexpr, V_CHUNK: tl.constexpr, V_A: tl.constexpr,
               V_DELTA: tl.constexpr, N: tl.constexpr):
    """Stored values in the codec's domain, ready for the P @ V dot: ``[N, D]``
    (model dtype for raw values, fp16 for int codes; element order rotated by V_C0)."""
    if V_KIND == 0:
        v = raw_tile(u8_ptr, r_ptr, slot, valid, KB, D, N)
    else:
        v = int_tile(u8_ptr, h_ptr, slot, valid, KB, V_BITS, V_GROUP, D, V_CB, V_CHUNK, V_A,
                     V_DELTA, N).to(tl.float16)
    return v
