"""Bit packing shared by every format.

Codes of ``b`` bits (b in 1, 2, 4, 8) are packed little-endian along the last dimension:
code ``i`` lives in byte ``i // (8 // b)`` at bit offset ``(i % (8 // b)) * b``. This is the
order ``numpy.packbits(..., bitorder="little")`` uses for b = 1, and it is the order a Triton
kernel recovers with shifts and ``tl.join``/``tl.reshape``.

3-bit codes are stored as two planes, each packed as above: the low two bits of every code
(``n / 4`` bytes), then the high bit (``n / 8`` bytes). A code never straddles a byte, and the
kernels reuse the 2- and 1-bit unpacking for the planes.
"""

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)  # the Triton pieces read them all
PLANES = {3: (2, 1)}  # widths stored as planes, low bits first
PACKED_BITS = (1, 2, 4, 8)  # widths packed whole into bytes


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 8, bits, device=device, dtype=torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` (each < 2**bits) -> packed bytes ``[..., n * bits // 8]``."""
    if bits in PLANES:
        parts, shift = [], 0
        for b in PLANES[bits]:
            parts.append(pack((codes >> shift) & ((1 << b) - 1), b))
            shift += b
        return torch.cat(parts, -1)
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).unflatten(-1, (-1, per_byte))
    return (grouped << _shifts(bits, codes.device)).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes ``[..., n * bits // 8]`` -> uint8 codes ``[..., n]``."""
    if bits in PLANES:
        n = packed.shape[-1] * 8 // bits
        codes, start, shift = None, 0, 0
        for b in PLANES[bits]:
            plane = unpack(packed[..., start:start + n * b // 8], b) << shift
            codes = plane if codes is None else codes | plane
            start, shift = start + n * b // 8, shift + b
        return codes
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    return codes.flatten(-2)


def as_fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float tensor ``[..., n]`` -> its fp16 bytes ``[..., 2n]`` (uint8)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 2n]`` -> float32 ``[..., n]`` (the bytes hold fp16 values)."""
    return b.contiguous().view(torch.float16).float()
