"""How one layer's page is shared by its KV heads when heads store different formats.

vLLM sees a layer's page (one block) as ``[H, block_size, C]`` bytes, ``C`` bytes per token
and KV head (``state_content_bytes``). When every head of the layer stores one format, ``C``
is that format's slot and nothing below applies. When heads differ (a per-head policy,
``"layers": {"5": {"heads": [...]}}``), the local heads are cut into **head groups**: runs of
consecutive heads with the same format. A block holds the groups one after the other, each
as ``[heads of the group, block_size, its own slot]``:

    block page = [group 0: H0 x bs x S0 | group 1: H1 x bs x S1 | ... | unused tail]

so each group is a strided ``[num_blocks, Hg, block_size, Sg]`` view of the layer's cache
(block stride = the page), the shape every store and attention path already takes: a group
runs them unchanged, with its own codecs. Slots stay 8-byte multiples and block sizes are
multiples of 16, so every group starts 128-byte aligned.

``C`` must be a pure function of the config on every tensor-parallel rank (vLLM allocates the
same number of blocks everywhere), but ranks hold different heads: ``C`` is the largest
per-rank mean, rounded up, and a rank whose heads need less leaves the tail of its page
unused. On one rank (or when every head's format is the same) nothing is wasted beyond that
rounding (under ``H`` bytes per token).
"""

from dataclasses import dataclass

import torch

from .layer_format import LayerFormat


def rank_kv_heads(rank: int, tp_size: int, total: int) -> list[int]:
    """Global indices of the KV heads tensor-parallel rank ``rank`` holds (vLLM's split: equal
    contiguous shares; with more ranks than heads, each head replicated on tp_size // total
    consecutive ranks)."""
    if tp_size <= total:
        local = total // tp_size
        return list(range(rank * local, (rank + 1) * local))
    return [rank // (tp_size // total)]


def token_head_bytes(formats: tuple[LayerFormat, ...], head_size: int, tp_size: int) -> int:
    """``C``: bytes per token and local KV head of the layer's page, the same on every rank.
    ``formats``: the format of each global KV head."""
    slots = [f.slot_bytes(head_size) for f in formats]
    if len(set(slots)) == 1 and len(set(formats)) == 1:
        return slots[0]
    shares = [rank_kv_heads(r, tp_size, len(formats)) for r in range(tp_size)]
    return max(-(-sum(slots[h] for h in heads) // len(heads)) for heads in shares)


@dataclass(frozen=True)
class HeadGroup:
    """Consecutive local KV heads ``[start, stop)`` storing one format; their slots begin
    ``offset`` bytes per block-token into each block (the group's region of a block starts
    at ``block_size * offset``)."""

    start: int
    stop: int
    format: LayerFormat
    offset: int
    slot_bytes: int

    @property
    def heads(self) -> slice:
        return slice(self.start, self.stop)

    def query_heads(self, gqa: int) -> slice:
        """The query heads reading these KV heads (vLLM's grouping: query head i reads KV
        head i // gqa)."""
        return slice(self.start * gqa, self.stop * gqa)

    def view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """This group's ``[num_blocks, Hg, block_size, Sg]`` view of the layer's
        ``[num_blocks, H, block_size, C]`` cache."""
        nb, h, bs, c = kv_cache.shape
        n = self.stop - self.start
        if n == h and self.slot_bytes == c:
            return kv_cache
        if kv_cache.stride()[1:] != (bs * c, c, 1):
            raise ValueError(f"KVQ head groups need block-contiguous pages, got strides "
                             f"{kv_cache.stride()} for shape {tuple(kv_cache.shape)}")
        return kv_cache.as_strided((nb, n, bs, self.slot_bytes),
                                   (kv_cache.stride(0), bs * self.slot_bytes, self.slot_bytes, 1),
                                   kv_cache.storage_offset() + bs * self.offset)


def head_groups(formats: list[LayerFormat], head_size: int) -> list[HeadGroup]:
    """The groups of one rank's local heads (``formats``: the format of each local head)."""
    groups: list[HeadGroup] = []
    offset = 0
    for h, fmt in enumerate(formats):
        if groups and groups[-1].format == fmt:
            last = groups[-1]
            groups[-1] = HeadGroup(last.start, h + 1, fmt, last.offset, last.slot_bytes)
        else:
            groups.append(HeadGroup(h, h + 1, fmt, offset, fmt.slot_bytes(head_size)))
        offset += fmt.slot_bytes(head_size)
    return groups
