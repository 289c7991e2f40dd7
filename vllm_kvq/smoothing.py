"""Channel smoothing (WKVQuant's two-dimensional quantization): a static per-channel shift and
scale, fitted offline (``python -m vllm_kvq.wkvquant smooth``), that evens out channel outliers
before the per-token codes quantize a key or a value.

Per layer and global KV head h, with shift and scale vectors over the head's D channels:

    stored key    k~ = (k - a_k) / s_k        query   q~ = q * s_k
    stored value  v~ = (v - a_v) / s_v        output  o  = o~ * s_v + a_v

Attention stays exact in the smoothed domain: q~ . k~ = q . k - q . a_k, and q . a_k is the
same for every key a query reads, which softmax ignores (so every key a query sees -- packed,
in the exact window's ring, or this step's fresh tokens -- must be smoothed, and is: the
backend smooths at the entry of the layer); the softmax weights sum to one, so the weighted
sum of smoothed values un-smooths to the weighted sum of the values.

Composition with the formats: smoothing comes first, the format's own transform (the
per-head rotation of integer codes, QJL's projection) then acts on the smoothed vector.
KIVI keys are quantized per channel over token groups, so a per-channel affine of the keys
changes nothing but rounding there (its statistics absorb it); KIVI's per-token values do
benefit. Identity smoothing (shift 0, scale 1) stores the same bytes as no smoothing.
"""

from dataclasses import dataclass

import torch

# The four per-channel vectors a layer's smoothing may give, each [global KV heads, head size].
FIELDS = ("key_shift", "key_scale", "value_shift", "value_scale")


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, never element-wise
class LayerSmoothing:
    """One layer's smoothing over the model's global KV heads (float32 ``[H, D]`` tensors;
    None: identity for that part)."""

    key_shift: torch.Tensor | None = None
    key_scale: torch.Tensor | None = None
    value_shift: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    def shape_problem(self, num_kv_heads: int | None, head_size: int) -> str | None:
        """What is wrong with the vectors' shapes for this model, or None."""
        for name in FIELDS:
            t = getattr(self, name)
            if t is None:
                continue
            heads = t.shape[0] if num_kv_heads is None else num_kv_heads
            if tuple(t.shape) != (heads, head_size):
                return (f"{name} has shape {list(t.shape)}, but the model needs "
                        f"[{num_kv_heads or 'KV heads'}, {head_size}] (one row of head-size "
                        "channels per global KV head)")
        return None

    def is_identity(self) -> bool:
        return all(getattr(self, name) is None for name in FIELDS)

    def as_settings(self) -> dict:
        """The policy file's form: nested lists of floats (6 significant digits: the file is
        what the engine reads, so it is the smoothing, not an approximation of it)."""
        return {name: [[float(f"{x:.6g}") for x in row] for row in getattr(self, name).tolist()]
                for name in FIELDS if getattr(self, name) is not None}


class HeadSmoothing:
    """A layer's smoothing on one rank's KV heads, applied around the attention paths.

    Keys and values ``[T, H, D]``, queries and outputs ``[T, Hq, D]`` (query head j reads KV
    head j // gqa). The arithmetic is float32, each result rounded once to the model dtype."""

    def __init__(self, layer: LayerSmoothing, global_heads: list[int], gqa: int, device):
        def rows(t, per_query_head=False):
            if t is None:
                return None
            t = t[global_heads].to(device=device, dtype=torch.float32)
            return t.repeat_interleave(gqa, 0) if per_query_head else t

        self.key_shift, self.key_scale = rows(layer.key_shift), rows(layer.key_scale)
        self.query_scale = rows(layer.key_scale, per_query_head=True)
        self.value_shift, self.value_scale = rows(layer.value_shift), rows(layer.value_scale)
        self.output_shift = rows(layer.value_shift, per_query_head=True)
        self.output_scale = rows(layer.value_scale, per_query_head=True)

    @staticmethod
    def _forward(x: torch.Tensor, shift, scale) -> torch.Tensor:
        if shift is None and scale is None:
            return x
        y = x.float()
        if shift is not None:
            y = y - shift
        if scale is not None:
            y = y / scale
        return y.to(x.dtype)

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        return self._forward(k, self.key_shift, self.key_scale)

    def values(self, v: torch.Tensor) -> torch.Tensor:
        return self._forward(v, self.value_shift, self.value_scale)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.query_scale is None else (q.float() * self.query_scale).to(q.dtype)

    def unsmooth_output(self, out: torch.Tensor) -> None:
        """``out`` (smoothed-domain attention output) back to model space, in place."""
        if self.output_shift is None and self.output_scale is None:
            return
        y = out.float()
        if self.output_scale is not None:
            y = y * self.output_scale
        if self.output_shift is not None:
            y = y + self.output_shift
        out.copy_(y)
