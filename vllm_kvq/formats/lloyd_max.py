"""Rotated vectors with one scale per vector and a Lloyd-Max codebook (TurboQuant's MSE codes).

After a random rotation R, every coordinate of y = R x looks like a coordinate of a uniformly
random direction scaled by ||x||: with u = y * sqrt(D) / ||y||, each u_i has the density
    f(u) ~ (1 - u^2 / D)^((D - 3) / 2)  on |u| < sqrt(D)     (close to N(0, 1))
whatever x was. So one fixed codebook serves every vector: the 2^b Lloyd-Max centroids c of f
(the minimum-MSE b-bit quantizer of that density, ``codebook``), and each vector stores only
    code_i = nearest centroid of u_i,    s = <y, c[code]> / <c[code], c[code]>  (fp16)
and decodes as y_hat = s * c[code] (s is the least-squares scale of the chosen centroids, so
the error is orthogonal to the reconstruction). Side information is 2 bytes per vector,
against 4 bytes per 32 channels for ``int_group``.

Byte layout: ``[codes: D*b/8 | scale: fp16]``. No kernel pieces yet: layers in this format run
on the torch path.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import bits as bitpack
from .int_group import MAX_ROTATED_HEAD, RotatedCodec
from .registry import StorageFormat, register


@functools.lru_cache(maxsize=64)
def codebook(bits: int, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids ``[2^b]``, decision boundaries ``[2^b - 1]``) of the Lloyd-Max quantizer of
    one rotated, norm-scaled coordinate (module docstring), by Lloyd iterations on a grid."""
    d = head_size
    u = np.linspace(-math.sqrt(d), math.sqrt(d), 200_001)[1:-1]
    w = np.exp((d - 3) / 2 * np.log1p(-u * u / d))
    w /= w.sum()
    cdf = np.cumsum(w)
    levels = 1 << bits
    c = np.interp((np.arange(levels) + 0.5) / levels, cdf, u)  # start from quantiles
    for _ in range(500):
        edges = (c[1:] + c[:-1]) / 2
        cell = np.searchsorted(edges, u)
        mass = np.bincount(cell, w, levels)
        c_new = np.bincount(cell, w * u, levels) / mass
        if np.abs(c_new - c).max() < 1e-10:
            break
        c = c_new
    c = (c - c[::-1]) / 2  # the density is symmetric: make the codebook exactly so
    return c.astype(np.float32), ((c[1:] + c[:-1]) / 2).astype(np.float32)


@register
@dataclass(frozen=True)
class LloydMax(StorageFormat):
    """Rotated ``bits``-bit Lloyd-Max codes, one fp16 scale per vector (keys or values)."""

    kind = "lloyd"
    kernel_kind = 4
    settings = ("bits",)
    bits: int = 4

    def nbytes(self, head_size: int) -> int:
        return head_size * self.bits // 8 + 2

    def describe(self) -> str:
        return f"rotated {self.bits}-bit Lloyd-Max, one scale per vector"

    def tag(self) -> str:
        return f"lloyd{self.bits}"

    def check(self, role, head_size, window, block_size, where):
        if head_size > MAX_ROTATED_HEAD or head_size % 8:
            return (f"KVQ Lloyd-Max codes ({role}s of {where}) need a head size that is a "
                    f"multiple of 8 up to {MAX_ROTATED_HEAD}, the model has {head_size}; "
                    "choose integer codes (a preset like k4v3).")
        return super().check(role, head_size, window, block_size, where)

    def codec(self, head_size, dtype, seed, layer, global_heads):
        return LloydMaxCodec(head_size, self.bits, seed, layer, global_heads)

    def kernel_gap(self, role, head_size):
        return "no kernel pieces for Lloyd-Max codes"

    def kernel_fields(self, head_size):
        raise NotImplementedError("Lloyd-Max codes have no kernel pieces")


class LloydMaxCodec(RotatedCodec):
    def __init__(self, head_size: int, bits: int, seed: int, layer: int,
                 global_heads: list[int]):
        self.spec = LloydMax(bits)
        self.head_size, self.bits = head_size, bits
        self.code_bytes = head_size * bits // 8
        self.nbytes = self.code_bytes + 2
        centroids, edges = codebook(bits, head_size)
        self.centroids, self.edges = torch.from_numpy(centroids), torch.from_numpy(edges)
        self.set_rotations(seed, layer, global_heads, head_size)

    def to(self, device) -> "LloydMaxCodec":
        self.centroids, self.edges = self.centroids.to(device), self.edges.to(device)
        return super().to(device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` -> slot bytes ``[T, H, C]``."""
        y = self.rotate_in(x)
        norm = y.norm(dim=-1, keepdim=True)
        u = (y * (math.sqrt(self.head_size) / norm.clamp_min(1e-30))).contiguous()
        codes = torch.bucketize(u, self.edges)
        c = self.centroids[codes]
        scale = (y * c).sum(-1) / (c * c).sum(-1)
        return torch.cat([bitpack.pack(codes.to(torch.uint8), self.bits),
                          bitpack.as_fp16_bytes(scale.unsqueeze(-1))], -1)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """scale * centroid[code], rotated domain."""
        codes = bitpack.unpack(packed[..., :self.code_bytes], self.bits).long()
        scale = bitpack.from_fp16_bytes(packed[..., self.code_bytes:self.code_bytes + 2])
        return self.centroids[codes] * scale
