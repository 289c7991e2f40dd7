"""The codec interface: the torch reference of a storage format, and the CPU execution path.

Shapes used throughout (per layer, H = local KV heads, D = head size, C = codec bytes):
  encode:  x ``[T, H, D]`` -> bytes ``[T, H, C]``
  decode:  bytes ``[..., H, N, C]`` -> float32 ``[..., H, N, D]`` in the codec's domain
  queries: ``[..., H, M, D]`` where the M rows are all query heads (times query tokens) that
           share KV head h -- GQA grouping, so packed bytes are read once per KV head.
A codec holds the per-head constants of one layer (rotations, projections) for its local heads.
"""

import torch

from .registry import StorageFormat


class Codec:
    nbytes: int
    spec: "StorageFormat"  # the registered format this codec is the reference of

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- keys -------------------------------------------------------------------------------
    def prepare_queries(self, q: torch.Tensor):
        """Per-step query transform (done once per step, not per context token)."""
        return q.float()

    def scores(self, prepared, packed: torch.Tensor) -> torch.Tensor:
        """<q, k> for every query row and stored key: ``[..., H, M, N]`` (unscaled)."""
        return prepared @ self.decode(packed).transpose(-1, -2)

    # -- values -----------------------------------------------------------------------------
    def to_codec_domain(self, x: torch.Tensor) -> torch.Tensor:
        """Exact (unquantized) vectors ``[..., H, N, D]`` -> the domain ``decode`` returns."""
        return x

    def finish_output(self, out: torch.Tensor) -> torch.Tensor:
        """Map an attention output accumulated in the codec's domain back to model space."""
        return out

    def to(self, device) -> "Codec":
        return self

    # -- what the Triton kernels read besides the packed bytes -------------------------------
    def kernel_matrix(self) -> torch.Tensor | None:
        """The per-head matrix ``[H, rows, D]`` the store applies before quantizing (a
        rotation R or a projection S), or None."""
        return None

    def kernel_queries(self, q: torch.Tensor) -> torch.Tensor | None:
        """Queries ``[T, H, G, D]`` (fp32, grouped by KV head) as the kernels score these keys
        with, in channel order; None when the kernels read the raw query."""
        return q
