"""Full-precision passthrough: the model's 16-bit K or V bytes, for layers kept unquantized.

Kernel pieces: ``kernels/formats/raw.py``.
"""

from dataclasses import dataclass

import torch

from .codec import Codec
from .registry import StorageFormat, register


@register
@dataclass(frozen=True)
class Raw(StorageFormat):
    """The model's 16-bit values, unchanged."""

    kind = "raw"
    kernel_kind = 0

    def nbytes(self, head_size: int) -> int:
        return 2 * head_size

    def describe(self) -> str:
        return "16-bit"

    def tag(self) -> str:
        return "raw16"

    def codec(self, head_size, dtype, seed, layer, global_heads):
        return RawCodec(head_size, dtype)

    def kernel_fields(self, head_size):
        return dict(KIND=self.kernel_kind, BITS=16, GROUP=head_size, CB=2 * head_size,
                    ROT=False, SPLIT=False, extra={})


class RawCodec(Codec):
    spec = Raw()

    def __init__(self, head_size: int, dtype: torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"KVQ stores 16-bit fields of float16 or bfloat16 models, not "
                             f"{dtype}; run the model with --dtype bfloat16 or float16.")
        self.dtype = dtype
        self.nbytes = 2 * head_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The model's 16-bit bytes (kernel: ``store_raw``)."""
        return x.to(self.dtype).contiguous().view(torch.uint8)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """The stored values as float32 (kernel: ``raw_tile``)."""
        return packed.contiguous().view(self.dtype).float()

    def kernel_queries(self, q: torch.Tensor) -> None:
        return None  # the kernels read the raw query in the model dtype
