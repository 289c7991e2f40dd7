"""Chunked prefill against packed context: every request of a batch in two launches.

Queries are cut into tiles of ``BLOCK_Q`` tokens of one request x all query heads of a GQA
group (about 64 rows). Launch 1 (``paged_context_kernel``, grid (tiles, KV heads, splits))
attends every tile to the request's earlier context read from the packed blocks (no
dequantized copy of the prefix; scratch is one fp32 partial per query row and split).
Launch 2 (``merge_fresh_kernel``, grid (tiles, KV heads)) merges the splits, un-rotates once
and attends the tile to the chunk's own fresh K/V exactly and causally (flash-attention
style), after the request's exact recent window if there is one (read from the ring; see
``kernels.merge``). There is no per-request Python loop: requests differ only in the tile map.
"""

from dataclasses import dataclass

import torch

from .context import paged_context_kernel
from .decode import LOG2E, RingWindow, cache_views, check_cache, no_window_args
from .launch import (Launch, block_divisor, context_launch, interpreting, launch, merge_launch,
                     prefill_block_q)
from .layout import KernelLayout
from .merge import merge_fresh_kernel


# Every prefill tile height the launchers use (``launch.prefill_block_q``: powers of two).
TILE_HEIGHTS = tuple(1 << i for i in range(7))


def tile_map(query_start_loc, block_q: int) -> torch.Tensor:
    """``[4, tiles]`` int32 rows (request, first token, tokens, position of the first token in
    its request's chunk) cutting every request's query range into tiles of block_q tokens.
    Host tensors (``query_start_loc``: a host list or CPU tensor)."""
    qsl = torch.as_tensor(query_start_loc, dtype=torch.int64)
    qlens = qsl[1:] - qsl[:-1]
    ntiles = -(-qlens // block_q)
    req = torch.repeat_interleave(torch.arange(len(qlens)), ntiles)
    first = torch.repeat_interleave(torch.cumsum(ntiles, 0) - ntiles, ntiles)
    pos0 = (torch.arange(len(req)) - first) * block_q
    return torch.stack([req, qsl[req] + pos0, torch.clamp(qlens[req] - pos0, max=block_q),
                        pos0]).to(torch.int32)


@dataclass(frozen=True)
class PrefillPlan:
    """A step's prefill requests as the launches read them, planned once per step (by the
    metadata builder, FlashInfer's plan/run split) and reused by every layer: a layer's
    launches then do no host work and copy nothing to the device."""

    query_start: torch.Tensor  # int32 [R + 1]: each request's first row of the batch
    context_lens: torch.Tensor  # int32 [R]: tokens read packed before each chunk
    has_context: bool  # some request reads packed context (else no context launch)
    tile_maps: dict  # tile height -> int32 [4, tiles] (``tile_map``), every TILE_HEIGHTS


def plan_prefill_step(query_start_loc, context_lens, device) -> PrefillPlan:
    """The PrefillPlan of host lists (or CPU tensors) ``query_start_loc`` ``[R + 1]`` and
    ``context_lens`` ``[R]``: one host-to-device copy for everything."""
    qsl = torch.as_tensor(query_start_loc, dtype=torch.int32).reshape(-1)
    ctx = torch.as_tensor(context_lens, dtype=torch.int32).reshape(-1)
    maps = [tile_map(qsl, height) for height in TILE_HEIGHTS]
    flat = torch.cat([qsl, ctx, *(m.reshape(-1) for m in maps)]).to(device, non_blocking=True)
    query_start, rest = flat[:qsl.numel()], flat[qsl.numel():]
    context, rest = rest[:ctx.numel()], rest[ctx.numel():]
    tiles = {}
    for height, m in zip(TILE_HEIGHTS, maps):
        tiles[height], rest = rest[:m.numel()].view(m.shape), rest[m.numel():]
    return PrefillPlan(query_start, context, bool((ctx > 0).any()), tiles)


def plan_prefill(query, key, value, kv_cache, block_table, plan: PrefillPlan,
                 layout: KernelLayout, qprep, vrot, scale: float, num_splits: int = 1,
                 out=None, window: RingWindow | None = None,
                 packed_limits: torch.Tensor | None = None,
                 first_keys: torch.Tensor | None = None) -> tuple[list[Launch], torch.Tensor]:
    """query ``[T, Hq, D]``, key/value ``[T, H, D]``: the batch's new tokens, request r owning
    rows ``[query_start[r], query_start[r + 1])`` of the step's plan (``PrefillPlan``: device
    query starts, the tokens each request reads packed before its chunk (and its window),
    tile maps); block_table ``[R, max_blocks]``. Without packed context (``has_context``
    false, no row limits) the packed-context launch is skipped. window: the requests' exact
    recent windows (None: none). packed_limits ``[T]`` (device, optional): each token's L
    (``vllm_kvq.exactness``): keys before it are read packed, the chunk's own slots
    included; the chunk then attends to itself exactly only from L on (without it: the whole
    chunk, causally). first_keys ``[T]`` (device, optional; a sliding window): each token's
    first visible key. Returns the launches (the packed context, unless there is none, then
    the merge) and the output they fill."""
    t, hq, d = query.shape
    h = kv_cache.shape[1]
    g = hq // h
    bs = kv_cache.shape[2]
    check_cache(kv_cache, layout)
    dev = query.device
    if out is None:
        out = torch.empty(t, hq, d, dtype=torch.float32, device=dev)
    if t == 0:
        return [], out
    qstart, context_lens = plan.query_start, plan.context_lens
    row_limits, sliding = packed_limits is not None, first_keys is not None
    # Position of each request's first chunk token: its packed context and window.
    chunk_start = context_lens + window.exact if window is not None else context_lens
    lims = packed_limits if row_limits else context_lens  # (unused without row limits)
    first = first_keys if sliding else context_lens  # (unused without a sliding window)
    s = max(1, int(num_splits)) if plan.has_context or row_limits else 0
    # Partials are indexed by (split, token, query head), so the two launches tile freely.
    part_acc = torch.empty(max(s, 1), t, hq, d, dtype=torch.float32, device=dev)
    part_ml = torch.empty(max(s, 1), t, hq, 2, dtype=torch.float32, device=dev)
    sc = float(scale) * LOG2E
    launches = []
    if s > 0:
        block_q = prefill_block_q(layout, g, "context", sliding)
        maps = plan.tile_maps[block_q]
        u8, f16, raw = cache_views(kv_cache, layout)
        qp = qprep if qprep is not None else query
        launches.append(launch(paged_context_kernel, (maps.shape[1], h, s), (
            qp, query, query.stride(0), query.stride(1),
            u8, f16, raw, kv_cache.stride(0), kv_cache.stride(1),
            block_table, block_table.stride(0), context_lens, lims, first,
            maps[0], maps[1], maps[2],
            part_acc, part_ml, t, h, g, block_q, bs, *block_divisor(bs), s, sc),
            context_launch(layout, block_q * g, False, interpreting(), row_limits=row_limits,
                           first_keys=sliding)))
    block_q = prefill_block_q(layout, g, "merge")
    maps = plan.tile_maps[block_q]
    launches.append(launch(merge_fresh_kernel, (maps.shape[1], h), (
        part_acc, part_ml, s,
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1), vrot if vrot is not None else part_acc,
        out, out.stride(0), out.stride(1),
        maps[0], maps[1], maps[2], maps[3], qstart, lims, chunk_start, first,
        *(window.merge_args() if window is not None else no_window_args(key, qstart)),
        t, h, g, block_q, sc),
        merge_launch(layout, block_q * g, False, interpreting(), window=window is not None,
                     row_limits=row_limits, first_keys=sliding)))
    return launches, out
