"""Per-token asymmetric group quantization, optionally after a seeded per-head rotation.

For each token and head, channels are split in groups of G. Per group:
    scale = (max - min) / (2^b - 1),   code = round((x - min) / scale),   x_hat = code*scale + min
with scale and min stored as fp16 (the codes are computed against the fp16-rounded values, so
decode is exact to what was stored).

1-bit codes use the two centroids instead of the extremes: with mid = (min + max) / 2, the
levels are the means of the elements at or below mid and of those above it (one Lloyd step from
min/max), stored in the same scale/min fields (min = lower centroid, scale = their distance), so
decode is unchanged. Min/max levels would put every element at its group's extreme: for
Gaussian-like (rotated) data that error exceeds the data's own variance (relative MSE ~2.7 at
64 channels); the centroids give ~0.36.

Rotation (``rotate=True``): x is stored as R x with R orthogonal (randomized Hadamard for
power-of-two head sizes). Keys: <q, k> = <R q, R k>, so queries are rotated once per step.
Values: sum_i p_i v_i = R^T sum_i p_i (R v_i), so the attention output is rotated back once.

Byte layout: ``[codes: D*b/8 | scales: fp16 x D/G | mins: fp16 x D/G]``.
Kernel pieces: ``kernels/formats/int_group.py``.
"""

import math
from dataclasses import dataclass

import torch

from . import bits as bitpack
from .codec import Codec
from .random_maps import rotation
from .registry import StorageFormat, is_pow2, register

MAX_ROTATED_HEAD = 1024  # rotations are dense [D, D] matrices per head


@register
@dataclass(frozen=True)
class IntGroup(StorageFormat):
    """Per-token ``bits``-bit codes in groups of ``group_size`` channels, an fp16 scale and
    min per group; optionally after a seeded per-head rotation (keys or values)."""

    kind = "int"
    kernel_kind = 1
    settings = ("bits", "group_size", "rotate")
    bits: int = 16
    group_size: int = 32
    rotate: bool = False

    def nbytes(self, head_size: int) -> int:
        return head_size * self.bits // 8 + 4 * (head_size // self.group_size)

    def describe(self) -> str:
        return f"{'rotated ' if self.rotate else ''}{self.bits}-bit g{self.group_size}"

    def tag(self) -> str:
        return f"{'r' if self.rotate else ''}int{self.bits}g{self.group_size}"

    def check(self, role, head_size, window, block_size, where):
        g = self.group_size
        if g > head_size or head_size % g:
            return (f"KVQ group_size={g} ({role}s of {where}) does not divide the model's head "
                    f"size {head_size}; allowed values are powers of two from 8 up to "
                    f"{head_size} that divide it.")
        if self.rotate and head_size > MAX_ROTATED_HEAD:
            return (f"KVQ rotate=true supports head sizes up to {MAX_ROTATED_HEAD}, the model "
                    f"has {head_size}; set rotate to false.")
        return super().check(role, head_size, window, block_size, where)

    def codec(self, head_size, dtype, seed, layer, global_heads):
        return IntGroupCodec(head_size, self.bits, self.group_size, self.rotate, seed, layer,
                             global_heads)

    def kernel_gap(self, role, head_size):
        if self.bits not in bitpack.SUPPORTED_BITS:
            return f"unsupported bit width {self.bits}"
        g = self.group_size
        if not is_pow2(g) or g > head_size or g < 8:
            return f"unsupported group size {g} for head size {head_size}"
        return None

    def kernel_fields(self, head_size):
        cb = head_size * self.bits // 8
        # 3-bit codes (two planes) are dequantized whole, never consumed per bit position
        return dict(KIND=self.kernel_kind, BITS=self.bits, GROUP=self.group_size, CB=cb,
                    ROT=self.rotate, SPLIT=cb >= 16 and self.bits in bitpack.PACKED_BITS,
                    extra={})


def two_level_centroids(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """1-bit levels of groups along the last dim of ``g`` (float32; ``lo``/``hi`` its min and
    max): the means of the elements at or below / above the midpoint."""
    up = g > ((lo + hi) * 0.5).unsqueeze(-1)
    n_up = up.sum(-1).double()
    # float64 sums of float32 elements are exact whatever the order (so the CPU kernel's
    # bytes match); rounded once to float32.
    g = g.double()
    low = torch.where(up, 0.0, g).sum(-1) / (g.shape[-1] - n_up).clamp_min(1.0)
    high = torch.where(n_up > 0, torch.where(up, g, 0.0).sum(-1) / n_up.clamp_min(1.0), low)
    return low.float(), high.float()


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """H x along the last dim (Sylvester order, unnormalized), by in-place-style butterflies
    in x's dtype: stage h pairs element j with j + h inside blocks of 2h (a+b, a-b)."""
    d, h = x.shape[-1], 1
    while h < d:
        pairs = x.unflatten(-1, (d // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), -2).flatten(-3)
        h *= 2
    return x


class RotatedCodec(Codec):
    """A codec that stores R x with a seeded per-head rotation R (or x itself, rot None)."""

    rot: torch.Tensor | None = None  # [H, D, D]
    signs: torch.Tensor | None = None  # [H, D]: R = H diag(signs) / sqrt(D) (Hadamard R)

    def set_rotations(self, seed: int, layer: int, global_heads: list[int], head_size: int):
        self.rot = torch.stack([rotation(seed, layer, h, head_size) for h in global_heads])
        # The first row of a Sylvester Hadamard is all ones: R[0, j] = s_j / sqrt(D).
        self.signs = torch.sign(self.rot[:, 0, :]).contiguous() if is_pow2(head_size) else None

    def to(self, device) -> "RotatedCodec":
        if self.rot is not None:
            self.rot = self.rot.to(device)
        if self.signs is not None:
            self.signs = self.signs.to(device)
        return self

    def rotate_in(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` -> R x per head, float32, as the store computes it."""
        x = x.float()
        if self.rot is None:
            return x
        if self.signs is not None:  # the CPU kernel runs the same butterflies: same bytes
            return hadamard_transform(x * self.signs) * (1.0 / math.sqrt(x.shape[-1]))
        # float64, then rounded: fp32 GEMMs round differently at different batch sizes
        # (T=1 takes another kernel), and stored bytes must not depend on the batch.
        return torch.einsum("hij,thj->thi", self.rot.double(), x.double()).float()

    def to_codec_domain(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # [..., H, N, D] -> R x per head
        return x if self.rot is None else x @ self.rot.transpose(-1, -2)

    def prepare_queries(self, q: torch.Tensor) -> torch.Tensor:
        return self.to_codec_domain(q)

    def finish_output(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.rot is None else out @ self.rot

    def kernel_matrix(self) -> torch.Tensor | None:
        return self.rot

    def kernel_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``[T, H, G, D]`` -> R q per KV head (the plain query without rotation)."""
        return q if self.rot is None else torch.einsum("thgd,hid->thgi", q, self.rot.to(q))


class IntGroupCodec(RotatedCodec):
    def __init__(self, head_size: int, bits: int, group_size: int, rotate: bool,
                 seed: int, layer: int, global_heads: list[int]):
        self.spec = IntGroup(bits, group_size, rotate)
        self.head_size, self.bits, self.group_size = head_size, bits, group_size
        self.groups = head_size // group_size
        self.code_bytes = head_size * bits // 8
        self.nbytes = self.code_bytes + 4 * self.groups
        if rotate:
            self.set_rotations(seed, layer, global_heads, head_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` -> slot bytes ``[T, H, C]`` (kernel: ``store_int``)."""
        x = self.rotate_in(x)
        g = x.unflatten(-1, (self.groups, self.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
        if self.bits == 1:
            lo, hi = two_level_centroids(g, lo, hi)
        levels = (1 << self.bits) - 1
        scale16 = ((hi - lo) / levels).half()
        lo16 = lo.half()
        safe = torch.where(scale16 == 0, torch.ones_like(scale16), scale16).float()
        codes = torch.round((g - lo16.float().unsqueeze(-1)) / safe.unsqueeze(-1))
        codes = codes.clamp_(0, levels).to(torch.uint8).flatten(-2)
        return torch.cat([bitpack.pack(codes, self.bits),
                          scale16.view(torch.uint8), lo16.view(torch.uint8)], -1)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """Codes * scale + min per group, rotated domain (kernel: ``int_tile`` /
        ``int_piece``; as keys, ``int_key_scores``)."""
        cb, gb = self.code_bytes, 2 * self.groups
        codes = bitpack.unpack(packed[..., :cb], self.bits).float()
        scale = bitpack.from_fp16_bytes(packed[..., cb:cb + gb])
        lo = bitpack.from_fp16_bytes(packed[..., cb + gb:cb + 2 * gb])
        g = codes.unflatten(-1, (self.groups, self.group_size))
        return (g * scale.unsqueeze(-1) + lo.unsqueeze(-1)).flatten(-2)
