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

import torch

from .context import paged_context_kernel
from .decode import LOG2E, RingWindow, cache_views, check_cache, no_window_args
from .launch import Launch, context_launch, interpreting, launch, merge_launch, prefill_block_q
from .layout import KernelLayout
from .merge import merge_fresh_kernel


def tile_map(query_start_loc, block_q: int) -> torch.Tensor:
    """``[4, tiles]`` int32 rows (request, first token, tokens, position of the first token in
    its request's chunk) cutting every request's query range into tiles of block_q tokens."""
    qsl = torch.as_tensor(query_start_loc, dtype=torch.int64).cpu()
    qlens = qsl[1:] - qsl[:-1]
    ntiles = -(-qlens // block_q)
    req = torch.repeat_interleave(torch.arange(len(qlens)), ntiles)
    first = torch.repeat_interleave(torch.cumsum(ntiles, 0) - ntiles, ntiles)
    pos0 = (torch.arange(len(req)) - first) * block_q
    return torch.stack([req, qsl[req] + pos0, torch.clamp(qlens[req] - pos0, max=block_q),
                        pos0]).to(torch.int32)


def _maps(query_start_loc, block_q: int, device) -> torch.Tensor:
    return tile_map(query_start_loc, block_q).to(device, non_blocking=True)


def plan_prefill(query, key, value, kv_cache, block_table, query_start_loc, context_lens,
                   layout: KernelLayout, qprep, vrot, scale: float, num_splits: int = 1,
                   has_context: bool = True, out=None,
                   window: RingWindow | None = None,
                   packed_limits: torch.Tensor | None = None,
                   first_keys: torch.Tensor | None = None
                   ) -> tuple[list[Launch], torch.Tensor]:
    """query ``[T, Hq, D]``, key/value ``[T, H, D]``: the batch's new tokens, request r owning
    rows ``query_start_loc[r]:query_start_loc[r+1]`` (a host list); block_table
    ``[R, max_blocks]``; context_lens ``[R]`` device tensor of tokens read packed before each
    chunk (and its window). has_context=False skips the packed-context launch (every context
    length is 0). window: the requests' exact recent windows (None: none). packed_limits
    ``[T]`` (device, optional): each token's L (``vllm_kvq.exactness``): keys before it are
    read packed, the chunk's own slots included; the chunk then attends to itself exactly
    only from L on (without it: the whole chunk, causally). first_keys ``[T]`` (device,
    optional; a sliding window): each token's first visible key. Returns the launches (the packed
    context, unless there is none, then the merge) and the output they fill."""
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
    qstart = torch.as_tensor(query_start_loc, dtype=torch.int32).to(dev)
    row_limits, sliding = packed_limits is not None, first_keys is not None
    # Position of each request's first chunk token: its packed context and window.
    chunk_start = context_lens + window.exact if window is not None else context_lens
    lims = packed_limits if row_limits else context_lens  # (unused without row limits)
    first = first_keys if sliding else context_lens  # (unused without a sliding window)
    s = max(1, int(num_splits)) if has_context or row_limits else 0
    # Partials are indexed by (split, token, query head), so the two launches tile freely.
    part_acc = torch.empty(max(s, 1), t, hq, d, dtype=torch.float32, device=dev)
    part_ml = torch.empty(max(s, 1), t, hq, 2, dtype=torch.float32, device=dev)
    sc = float(scale) * LOG2E
    launches = []
    if s > 0:
        block_q = prefill_block_q(layout, g, "context", sliding)
        maps = _maps(query_start_loc, block_q, dev)
        u8, f16, raw = cache_views(kv_cache, layout)
        qp = qprep if qprep is not None else query
        launches.append(launch(paged_context_kernel, (maps.shape[1], h, s), (
            qp, query, query.stride(0), query.stride(1),
            u8, f16, raw, kv_cache.stride(0), kv_cache.stride(1),
            block_table, block_table.stride(0), context_lens, lims, first,
            maps[0], maps[1], maps[2],
            part_acc, part_ml, t, h, g, block_q, bs, s, sc),
            context_launch(layout, block_q * g, False, interpreting(), row_limits=row_limits,
                           first_keys=sliding)))
    block_q = prefill_block_q(layout, g, "merge")
    maps = _maps(query_start_loc, block_q, dev)
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
