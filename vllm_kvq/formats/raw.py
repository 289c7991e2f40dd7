"""Full-precision passthrough: the model's 16-bit K or V bytes, for layers kept unquantized."""

import torch

from .codec import Codec


class RawCodec(Codec):
    def __init__(self, head_size: int, dtype: torch.dtype):
        assert dtype in (torch.float16, torch.bfloat16), dtype
        self.dtype = dtype
        self.nbytes = 2 * head_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).contiguous().view(torch.uint8)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.contiguous().view(self.dtype).float()
