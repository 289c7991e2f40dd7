"""Kernel pieces of raw 16-bit fields (reference: ``vllm_kvq.formats.raw``).

``raw_tile``  <-> ``RawCodec.decode``: the field as ``[N, D]`` in the model dtype
``store_raw`` <-> ``RawCodec.encode``: the model's 16-bit bytes, unchanged
"""

import triton
import triton.language as tl

from vllm_kvq.formats.raw import Raw

KIND = tl.constexpr(Raw.kernel_kind)


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


@triton.jit
def store_raw(u8_ptr, base, ok, x, OFF: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
              RAW_BF16: tl.constexpr):
    """RawCodec.encode of BT tokens ``x`` ``[BT, D]`` at slot byte OFF."""
    if RAW_BF16:
        bits = x.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        bits = x.to(tl.float16).to(tl.int16, bitcast=True)
    bits = bits.to(tl.int32) & 0xFFFF
    b = tl.reshape(tl.join(bits & 255, bits >> 8), [BT, 2 * D]).to(tl.uint8)
    j = tl.arange(0, 2 * D)
    tl.store(u8_ptr + base[:, None] + OFF + j[None, :], b, mask=ok[:, None])
