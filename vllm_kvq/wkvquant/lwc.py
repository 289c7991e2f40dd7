"""Learnable weight clipping (OmniQuant's LWC): 4-bit weights whose per-group range is learned.

Each group of a weight row quantizes between ``sigmoid(lower) * min`` and ``sigmoid(upper) *
max`` of its values instead of its full range: clipping a few outlying weights buys a finer
step for all the others. ``lower`` and ``upper`` start at 4 (sigmoid = 0.982, about the full
range) and are trained through the rounding with a straight-through estimator.

The differentiable quantizer mirrors compressed-tensors' asymmetric int4 (codes in [-8, 7],
zero point in that range, the range widened to hold 0, the scale rounded to the model dtype),
so training sees the grid the checkpoint stores; the final weights come from
compressed-tensors itself (``qparams`` then ``weights.fake_quantize``).
"""

import torch

from .weights import Q_MAX, Q_MIN, QParams, calculate, group_range

INIT = 4.0  # OmniQuant's initial logit: sigmoid(4) = 0.982


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value ``dtype`` stores, identity in the backward pass."""
    return x + (x.to(dtype).to(x.dtype) - x).detach()


class ClippedWeight(torch.nn.Module):
    """A parametrization of a Linear's weight ``[out, in]``: its 4-bit fake quantization
    with learned clipping per group of ``group_size`` input channels (0: per output row)."""

    def __init__(self, weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype):
        super().__init__()
        self.checkpoint_group_size = group_size  # 0 stays 0: compressed-tensors' per-channel
        self.group_size = group_size or weight.shape[1]
        self.scale_dtype = scale_dtype
        lo, hi = group_range(weight.detach(), group_size)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi, persistent=False)
        self.lower = torch.nn.Parameter(torch.full_like(lo, INIT))
        self.upper = torch.nn.Parameter(torch.full_like(hi, INIT))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped range per group, widened to hold 0 (as compressed-tensors does)."""
        lo = (torch.sigmoid(self.lower) * self.lo).clamp(max=0)
        hi = (torch.sigmoid(self.upper) * self.hi).clamp(min=0)
        return lo, hi

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # compressed-tensors' steps: the zero point from the float32 scale, then the scale
        # stored in the model dtype, and quantize-dequantize in that dtype
        dt = self.scale_dtype
        lo, hi = self.bounds()
        scale = ((hi - lo) / (Q_MAX - Q_MIN)).clamp_min(torch.finfo(torch.float32).eps)
        zero_point = round_ste(Q_MIN - lo / scale).clamp(Q_MIN, Q_MAX)[..., None]
        stored = cast_ste(scale, dt)[..., None]
        w = weight.unflatten(1, (-1, self.group_size))
        scaled = cast_ste(cast_ste(w / stored, dt) + zero_point, dt)
        codes = round_ste(scaled.clamp(Q_MIN, Q_MAX))
        return cast_ste((codes - zero_point) * stored, dt).flatten(1)

    @torch.no_grad()
    def qparams(self) -> QParams:
        """The learned clipping as the checkpoint's scales and zero points."""
        lo, hi = self.bounds()
        return calculate(lo, hi, self.checkpoint_group_size, self.scale_dtype)
