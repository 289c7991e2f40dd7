"""KIVI keys: per-channel asymmetric quantization over groups of G consecutive tokens.

For each head and channel c, over the G tokens t of a group (Liu et al. 2024):
    scale_c = (max_t k[t, c] - min_t k[t, c]) / (2^b - 1)
    code[t, c] = round((k[t, c] - min_c) / scale_c),   k_hat[t, c] = code * scale_c + min_c
with scale and min stored as fp16 (1-bit codes: the two centroids, as in ``int_group``).
Per-channel statistics confine the fixed outlier channels of keys, which per-token groups
smear over every channel of the token.

A group can only be quantized once its G tokens exist, so it is packed when it completes (the
backend's group pass, ``pack_groups``, reads the group's earlier tokens from the exact recent
window); until then its tokens are read from the window, which therefore holds at least G
tokens. G divides the block size, so a group never spans two blocks, and blocks shared by
prefix caching (always full) hold only packed groups.

Byte layout of one token slot: ``[codes: D*b/8 | piece j of its group's statistics: 4*D/G]``.
A group's statistics -- fp16 scales of the D channels, then fp16 minimums, 4*D bytes -- are
cut into G equal pieces and token j of the group carries piece j, so every byte lives inside
the group's slots and the page size counts it.
Kernel pieces: ``kernels/formats/kivi.py``.
"""

from dataclasses import dataclass

import torch

from . import bits as bitpack
from .codec import Codec
from .int_group import two_level_centroids
from .registry import StorageFormat, register

# Key groups the kernels read: a context tile holds whole groups.
KERNEL_GROUPS = (16, 32, 64)


@register
@dataclass(frozen=True)
class KIVI(StorageFormat):
    """Keys only: per-channel ``bits``-bit codes over groups of ``group_size`` consecutive
    tokens, fp16 scale and min per channel and group (spread over the group's slots); a
    group is packed when it completes, so the layer needs the exact recent window."""

    kind = "kivi"
    kernel_kind = 3
    roles = ("key",)
    settings = ("bits", "group_size")
    bits: int = 2
    group_size: int = 32  # tokens per group

    @property
    def token_group(self) -> int:
        return self.group_size

    def nbytes(self, head_size: int) -> int:
        return head_size * self.bits // 8 + 4 * head_size // self.group_size

    def describe(self) -> str:
        return f"KIVI {self.bits}-bit per channel, {self.group_size}-token groups"

    def tag(self) -> str:
        return f"kivi{self.bits}g{self.group_size}"

    def check(self, role, head_size, window, block_size, where):
        g = self.group_size
        if role != "key":
            return (f"KVQ KIVI codes are per-channel key codes, but {where} asks for them for "
                    "values; allowed value codes are integer codes (value_bits 1, 2, 3, 4, 8) "
                    "and 16.")
        if window < g:
            return (f"KVQ KIVI keys ({where}) pack a {g}-token group from the exact window "
                    f"when it completes, so they need window >= {g} (got {window}); set "
                    f"\"window\" to {g} or more.")
        if (4 * head_size) % g:
            return (f"KVQ KIVI key groups of {g} tokens ({where}) must divide {4 * head_size} "
                    "(4 x the head size); allowed group sizes are powers of two that divide it.")
        if block_size is not None and block_size % g:
            return (f"KVQ KIVI keys pack {g}-token groups, which must divide --block-size (got "
                    f"{block_size}); allowed block sizes are multiples of {g}.")
        return None

    def codec(self, head_size, dtype, seed, layer, global_heads):
        return KIVIKeyCodec(head_size, self.bits, self.group_size)

    def kernel_gap(self, role, head_size):
        g = self.group_size
        if role != "key":
            return "KIVI is a key-only format"
        if self.bits not in bitpack.SUPPORTED_BITS:
            return f"unsupported bit width {self.bits}"
        if g not in KERNEL_GROUPS or (4 * head_size) % g or (4 * head_size // g) % 2:
            return (f"KVQ Triton kernels read KIVI key groups of "
                    f"{', '.join(map(str, KERNEL_GROUPS))} tokens with at least two statistics "
                    f"bytes per slot (group <= 2 x head size), got {g}-token groups at head "
                    f"size {head_size}")
        return None

    def kernel_fields(self, head_size):
        cb = head_size * self.bits // 8
        return dict(KIND=self.kernel_kind, BITS=self.bits, GROUP=self.group_size, CB=cb,
                    ROT=False, SPLIT=cb >= 16, extra={})


class KIVIKeyCodec(Codec):
    def __init__(self, head_size: int, bits: int, group_tokens: int):
        self.spec = KIVI(bits, group_tokens)
        self.head_size, self.bits, self.group_tokens = head_size, bits, group_tokens
        self.code_bytes = head_size * bits // 8
        self.piece_bytes = 4 * head_size // group_tokens
        self.nbytes = self.code_bytes + self.piece_bytes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token store (kernel: ``store_kivi``): a group cannot be quantized before it
        completes, so its key bytes are zero until ``encode_groups`` packs it. They are never
        read before that: the backend reads the tokens of an open group from the exact
        window."""
        return torch.zeros(*x.shape[:-1], self.nbytes, dtype=torch.uint8, device=x.device)

    def encode_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Completed groups ``[NG, G, H, D]`` -> their slots' key bytes ``[NG, G, H, C]``."""
        x = x.float()
        lo, hi = x.amin(1), x.amax(1)  # [NG, H, D]: per channel, over the group's tokens
        if self.bits == 1:
            lo, hi = two_level_centroids(x.movedim(1, -1), lo, hi)  # over the tokens
        levels = (1 << self.bits) - 1
        scale16, lo16 = ((hi - lo) / levels).half(), lo.half()
        safe = torch.where(scale16 == 0, torch.ones_like(scale16), scale16).float()
        codes = torch.round((x - lo16.float().unsqueeze(1)) / safe.unsqueeze(1))
        codes = codes.clamp_(0, levels).to(torch.uint8)  # [NG, G, H, D]
        stats = torch.cat([scale16.view(torch.uint8), lo16.view(torch.uint8)], -1)  # [NG,H,4D]
        pieces = stats.unflatten(-1, (self.group_tokens, self.piece_bytes)).transpose(1, 2)
        return torch.cat([bitpack.pack(codes, self.bits), pieces], -1)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """``[..., H, N, C]`` with N a multiple of G starting at a group boundary (whole
        blocks) -> ``[..., H, N, D]`` (kernel: ``kivi_key_scores``, statistics folded into
        the query)."""
        g, d = self.group_tokens, self.head_size
        codes = bitpack.unpack(packed[..., :self.code_bytes], self.bits).float()
        codes = codes.unflatten(-2, (-1, g))  # [..., H, N/G, G, D]
        stats = packed[..., self.code_bytes:].unflatten(-2, (-1, g)).flatten(-2)  # [..,N/G,4D]
        scale = bitpack.from_fp16_bytes(stats[..., :2 * d]).unsqueeze(-2)
        lo = bitpack.from_fp16_bytes(stats[..., 2 * d:]).unsqueeze(-2)
        return (codes * scale + lo).flatten(-3, -2)
