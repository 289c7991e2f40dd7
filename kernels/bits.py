"""Device helpers shared by every format's kernel pieces (mirror of ``vllm_kvq.formats.bits``).

``unpack`` / ``pack`` <-> ``formats.bits.unpack`` / ``pack`` (codes little-endian in a byte);
``load_f16`` / ``store_f16_bytes`` <-> ``formats.bits.from_fp16_bytes`` / ``as_fp16_bytes``;
``load_window`` reads a misaligned code field with aligned vector loads (``kernels.layout``);
``rint`` is ``torch.round``; ``dot16`` is a 16-bit dot that also runs under the interpreter.

Pointer conventions: ``u8_ptr``, ``h_ptr`` and ``r_ptr`` are the same KV-cache memory viewed
as uint8, float16 and the model's 16-bit dtype; ``slot`` is an int64 tensor of slot *byte*
offsets (multiples of 16 where the slot size is, else of 8), so every field offset is an
immediate and a field that starts 16-byte aligned is read with 16-byte vector loads. Loads of
the packed stream carry a ``# stream: bulk|wrap|side`` tag that
``benchmarks/compile_report.py`` reports widths by.
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
