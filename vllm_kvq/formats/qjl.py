"""QJL 1-bit key sketches (Zandieh, Daliri, Han 2024), with exact outlier channels.

Stored per token and KV head, for a key k:
    O      = the ``outliers`` channels of largest |k| (uint8 indices), kept exactly (fp16)
    k_in   = k with the channels in O set to zero
    bits   = sign(S k_in)            (m = sketch_dim bits, S from ``random_maps.qjl_projection``)
    norm   = ||k_in||                (fp16)
Score of a full-precision query q (queries are never quantized):
    <q, k> ~= <q_O, k_O> + sqrt(pi/2) / m * norm * <S q, sign(S k_in)>
The second term is an unbiased estimate of <q, k_in> because every row s of S is N(0, I):
E[sign(<s,k>) <s,q>] = sqrt(2/pi) <q,k>/||k||. S q is computed once per step per query.

Byte layout: ``[sign bits: m/8 | norm: fp16 | outlier values: fp16 x o | outlier idx: u8 x o]``.
Outlier choice is per token, so stored bytes never depend on other tokens or requests.
Kernel pieces: ``kernels/formats/qjl.py``.
"""

import math
from dataclasses import dataclass

import torch

from . import bits as bitpack
from .codec import Codec
from .random_maps import qjl_projection
from .registry import StorageFormat, is_pow2, pow2_at_least, register


@register
@dataclass(frozen=True)
class QJL(StorageFormat):
    """Keys only: sign bits of a ``sketch_dim``-row JL projection plus the fp16 norm; the
    ``outliers`` largest-magnitude channels of each token kept exactly (fp16 + uint8 index)."""

    kind = "qjl"
    kernel_kind = 2
    roles = ("key",)
    settings = ("sketch_dim", "outliers")
    sketch_dim: int = 256
    outliers: int = 0

    def nbytes(self, head_size: int) -> int:
        return self.sketch_dim // 8 + 2 + 3 * self.outliers

    def describe(self) -> str:
        return f"QJL m={self.sketch_dim}" + (f" +{self.outliers} outliers" if self.outliers
                                             else "")

    def tag(self) -> str:
        return f"qjl{self.sketch_dim}o{self.outliers}"

    def check(self, role, head_size, window, block_size, where):
        if self.outliers >= head_size:
            return (f"KVQ outliers={self.outliers} must be smaller than the head size "
                    f"{head_size}.")
        return super().check(role, head_size, window, block_size, where)

    def codec(self, head_size, dtype, seed, layer, global_heads):
        return QJLKeyCodec(head_size, self.sketch_dim, self.outliers, seed, layer, global_heads)

    def kernel_gap(self, role, head_size):
        m, o = self.sketch_dim, self.outliers
        if role != "key":
            return "QJL is a key-only format"
        if not is_pow2(m) or m < 64 or not 0 <= o < head_size:
            return f"unsupported QJL sketch (m={m}, outliers={o})"
        return None

    def kernel_fields(self, head_size):
        cb = self.sketch_dim // 8
        return dict(KIND=self.kernel_kind, BITS=1, GROUP=head_size, CB=cb, ROT=False,
                    SPLIT=cb >= 16, extra=dict(QJL_M=self.sketch_dim, QJL_O=self.outliers,
                                               QJL_OP=pow2_at_least(max(self.outliers, 1))))

    def query_width(self, head_size: int) -> int:
        return self.sketch_dim


class QJLKeyCodec(Codec):
    def __init__(self, head_size: int, sketch_dim: int, outliers: int,
                 seed: int, layer: int, global_heads: list[int]):
        self.spec = QJL(sketch_dim, outliers)
        self.head_size, self.sketch_dim, self.outliers = head_size, sketch_dim, outliers
        self.sign_bytes = sketch_dim // 8
        self.nbytes = self.sign_bytes + 2 + 3 * outliers
        self.proj = torch.stack([qjl_projection(seed, layer, h, sketch_dim, head_size)
                                 for h in global_heads])  # [H, m, D]
        self.estimator_scale = math.sqrt(math.pi / 2) / sketch_dim

    def to(self, device) -> "QJLKeyCodec":
        self.proj = self.proj.to(device)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` -> slot bytes ``[T, H, C]`` (kernel: ``store_qjl``)."""
        k = x.float()  # [T, H, D]
        parts = []
        if self.outliers:
            idx = k.abs().topk(self.outliers, dim=-1).indices.sort(-1).values
            vals = k.gather(-1, idx)
            k = k.scatter(-1, idx, 0.0)
        # float64: the sign of an fp32 GEMM near 0 could depend on the batch size.
        sketch = torch.einsum("hmd,thd->thm", self.proj.double(), k.double())
        parts.append(bitpack.pack((sketch >= 0).to(torch.uint8), 1))
        parts.append(bitpack.as_fp16_bytes(k.norm(dim=-1, keepdim=True)))
        if self.outliers:
            parts += [bitpack.as_fp16_bytes(vals), idx.to(torch.uint8)]
        return torch.cat(parts, -1)

    def _fields(self, packed: torch.Tensor):
        sb, o = self.sign_bytes, self.outliers
        signs = bitpack.unpack(packed[..., :sb], 1).float() * 2 - 1  # [..., N, m] in {-1, 1}
        norm = bitpack.from_fp16_bytes(packed[..., sb:sb + 2]).squeeze(-1)
        vals = bitpack.from_fp16_bytes(packed[..., sb + 2:sb + 2 + 2 * o])
        # Clamped because slots that were never written (masked out later) hold any byte.
        idx = packed[..., sb + 2 + 2 * o:sb + 2 + 3 * o].long().clamp_max(self.head_size - 1)
        return signs, norm, vals, idx

    def outlier_part(self, packed: torch.Tensor) -> torch.Tensor:
        """The exactly stored channels as a dense (mostly zero) key ``[..., H, N, D]``."""
        _, _, vals, idx = self._fields(packed)
        dense = torch.zeros(*packed.shape[:-1], self.head_size, device=packed.device)
        return dense.scatter(-1, idx, vals) if self.outliers else dense

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """A key with the same expected inner products: outliers + sqrt(pi/2)/m * norm * S^T s.

        Used only to inspect the format; attention uses ``scores`` (never a dense key).
        """
        signs, norm, _, _ = self._fields(packed)
        inlier = self.estimator_scale * norm.unsqueeze(-1) * (signs @ self.proj)
        return self.outlier_part(packed) + inlier

    def prepare_queries(self, q: torch.Tensor):
        q = q.float()  # [..., H, M, D]
        return q, q @ self.proj.transpose(-1, -2)  # (q, S q)

    def scores(self, prepared, packed: torch.Tensor) -> torch.Tensor:
        """The estimator, outliers exact (kernel: ``qjl_key_scores``)."""
        q, sq = prepared
        signs, norm, _, _ = self._fields(packed)
        est = (sq @ signs.transpose(-1, -2)) * (self.estimator_scale * norm.unsqueeze(-2))
        if self.outliers:
            est = est + q @ self.outlier_part(packed).transpose(-1, -2)
        return est

    def kernel_matrix(self) -> torch.Tensor:
        return self.proj

    def kernel_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``[T, H, G, D]`` -> sqrt(pi/2)/m * S q per KV head (the estimator's query side)."""
        return torch.einsum("thgd,hmd->thgm", q, self.proj.to(q)) * self.estimator_scale
