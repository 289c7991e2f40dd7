"""Paged split-K decode over packed KV blocks: the plan of the ``context`` + ``merge`` launches.

One new token per request. Launch 1 (``paged_context_kernel``): grid (requests, KV heads,
splits); every program handles all query heads of one GQA group, so each packed block is
read once per KV head. Launch 2 (``merge_fresh_kernel``): grid (requests, KV heads); LSE
merge of the splits, one un-rotation of the value accumulator, and the token's own fresh
K/V attended exactly. The number of splits is a launch constant (default depends only on
batch size and head count), so the pair of launches is CUDA-graph capturable; per-split
work is derived from ``context_lens`` on the device. An exact recent window (``RingWindow``)
is read by the merge launch, straight from the layer's ring.
"""

import math
from dataclasses import dataclass

import torch

from .context import paged_context_kernel
from .launch import Launch, block_divisor, context_launch, interpreting, launch, merge_launch
from .layout import KernelLayout
from .merge import merge_fresh_kernel

LOG2E = 1.0 / math.log(2.0)


def cache_views(kv_cache: torch.Tensor, layout: KernelLayout):
    """uint8, fp16 and model-dtype views of the same cache memory."""
    raw_dtype = torch.bfloat16 if layout.RAW_BF16 else torch.float16
    return kv_cache, kv_cache.view(torch.float16), kv_cache.view(raw_dtype)


def check_cache(kv_cache: torch.Tensor, layout: KernelLayout) -> None:
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4:
        raise ValueError("kv_cache must be the layer's [blocks, heads, block_size, slot] uint8 "
                         "view")
    sb = layout.SB
    if kv_cache.shape[-1] != sb or kv_cache.stride(3) != 1 or kv_cache.stride(2) != sb:
        raise ValueError(f"kv_cache slots must be {layout.SB} contiguous bytes, got shape "
                         f"{tuple(kv_cache.shape)} strides {kv_cache.stride()}")
    group = layout.key.token_group  # a key group never spans two blocks
    if group and kv_cache.shape[2] % group:
        raise ValueError(f"{layout.key.describe()} keys: groups of {group} tokens must divide "
                         f"the block size, got {kv_cache.shape[2]}")


@dataclass(frozen=True)
class RingWindow:
    """The exact recent window of a batch of rows, read in place from a ring.

    ring_k / ring_v ``[slots, R, H, D]`` in the model dtype (any strides with contiguous rows
    of D; both alike); per row of the batch (request), ``slots`` (-1: none), ``first`` (the
    position of its first window token = its packed context length; position p sits at ring
    index p % R) and ``exact`` (window tokens, 0..R), device tensors ``[B]``."""

    ring_k: torch.Tensor
    ring_v: torch.Tensor
    slots: torch.Tensor
    first: torch.Tensor
    exact: torch.Tensor

    def __post_init__(self):
        k, v = self.ring_k, self.ring_v
        if k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride() or \
                k.stride(3) != 1 or k.dtype != v.dtype:
            raise ValueError(f"ring K/V must be alike [slots, R, H, D] with contiguous rows, got "
                             f"{tuple(k.shape)} {k.stride()} / {tuple(v.shape)} {v.stride()}")

    def merge_args(self) -> tuple:
        """The merge kernel's ring arguments."""
        k = self.ring_k
        return (k, self.ring_v, k.stride(0), k.stride(1), k.stride(2), k.shape[1],
                self.slots, self.first, self.exact)


def no_window_args(dummy_ptr: torch.Tensor, dummy_ints: torch.Tensor) -> tuple:
    """Placeholders for the merge kernel's ring arguments when WINDOW is off (never read)."""
    return (dummy_ptr, dummy_ptr, 0, 0, 0, 1, dummy_ints, dummy_ints, dummy_ints)


def plan_decode(query, key, value, kv_cache, block_table, context_lens, layout: KernelLayout,
                qprep, vrot, scale: float, num_splits: int, out=None,
                window: RingWindow | None = None,
                first_keys: torch.Tensor | None = None) -> tuple[list[Launch], torch.Tensor]:
    """query ``[B, Hq, D]``, key/value ``[B, H, D]`` (this step's tokens), block_table
    ``[B, max_blocks]``, context_lens ``[B]`` (tokens read packed, before the window and this
    one). qprep: prepared queries fp32 ``[B, Hq, QK]`` (None for raw keys). window: the
    rows' exact recent windows (None: none). first_keys ``[B]`` int32 (a sliding window, or
    None): each row's first visible key. Returns the two launches and the output they
    fill, ``[B, Hq, D]`` (fp32 unless ``out`` is given)."""
    b, hq, d = query.shape
    h = kv_cache.shape[1]
    g = hq // h
    bs = kv_cache.shape[2]
    check_cache(kv_cache, layout)
    if out is None:
        out = torch.empty(b, hq, d, dtype=torch.float32, device=query.device)
    if b == 0:
        return [], out
    s = max(1, int(num_splits))
    part_acc = torch.empty(s, b, hq, d, dtype=torch.float32, device=query.device)
    part_ml = torch.empty(s, b, hq, 2, dtype=torch.float32, device=query.device)
    u8, f16, raw = cache_views(kv_cache, layout)
    sc = float(scale) * LOG2E
    qp = qprep if qprep is not None else query
    sliding = first_keys is not None
    first = first_keys if sliding else context_lens
    # Position of each row's new token (the merge reads first keys relative to it).
    chunk_start = context_lens + window.exact if sliding and window is not None else \
        context_lens
    context = launch(paged_context_kernel, (b, h, s), (
        qp, query, query.stride(0), query.stride(1),
        u8, f16, raw, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0), context_lens, context_lens, first,
        context_lens, context_lens, context_lens,  # row limits and tile maps unused in decode
        part_acc, part_ml, b, h, g, 1, bs, *block_divisor(bs), s, sc),
        context_launch(layout, g, True, interpreting(), first_keys=sliding))
    merge = launch(merge_fresh_kernel, (b, h), (
        part_acc, part_ml, s,
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1), vrot if vrot is not None else part_acc,
        out, out.stride(0), out.stride(1),
        context_lens, context_lens, context_lens, context_lens, context_lens,
        context_lens, chunk_start, first,  # tile maps and row limits unused in decode
        *(window.merge_args() if window is not None else no_window_args(key, context_lens)),
        b, h, g, 1, sc),
        merge_launch(layout, g, True, interpreting(), window=window is not None,
                     first_keys=sliding))
    return [context, merge], out
