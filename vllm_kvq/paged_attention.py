"""Attention over packed paged KV blocks, in torch: the reference and the CPU path.

Past-only quantization (WKVQuant): a token attends to its own fresh K/V exactly and to
earlier keys by reading packed blocks, except the few that ``vllm_kvq.exactness`` keeps exact
(the recent window, never across a block boundary); a prefill query reads its own chunk's
earlier tokens packed too (``packed_limits``), so an answer never depends on what the prefix
cache held. Without ``packed_limits`` a chunk attends to itself exactly (``prefill_exact``).
One online softmax runs over context chunks of bounded size, then over the exact tokens, so
scratch memory is bounded by ``chunk_tokens`` and the query tile, never by a request's whole
context, and no dequantized copy of the cache is ever made.

Layout: ``kv_cache`` is the layer's ``[num_blocks, H, block_size, slot_bytes]`` uint8 view;
a slot is ``[key bytes | value bytes | padding]`` (see ``formats.layer_format``).
Queries are grouped per KV head: ``[B, H, M, D]`` where the M rows are the query heads of
that KV head (times query tokens), so each packed block is read once per KV head.
"""

import torch

from .formats import Codec
from .window import RecentKV, gather_ring

CONTEXT_CHUNK_TOKENS = 2048
QUERY_TILE_TOKENS = 256


class OnlineSoftmax:
    """Running max / sum / weighted sum over key chunks, for rows ``[B, H, M]``."""

    def __init__(self, rows: tuple[int, ...], head_size: int, device):
        self.max = torch.full(rows, float("-inf"), device=device)
        self.sum = torch.zeros(rows, device=device)
        self.acc = torch.zeros(*rows, head_size, device=device)

    def update(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores ``[B, H, M, N]`` (scaled, -inf where masked), values ``[B, H, N, D]``."""
        new_max = torch.maximum(self.max, scores.amax(-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        alpha = torch.exp(self.max - safe_max)
        p = torch.exp(scores - safe_max.unsqueeze(-1))
        self.sum = self.sum * alpha + p.sum(-1)
        self.acc = self.acc * alpha.unsqueeze(-1) + p @ values
        self.max = new_max

    def result(self) -> torch.Tensor:
        return self.acc / self.sum.clamp_min(1e-30).unsqueeze(-1)


def store_slots(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor, key_codec: Codec, value_codec: Codec) -> None:
    """Pack ``key``/``value`` ``[T, H, D]`` into the slots named by ``slot_mapping``.

    Entries of -1 are padding and are skipped.
    """
    n = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    if slots.numel() == 0:
        return
    k, v = key[:n][valid], value[:n][valid]
    packed = torch.cat([key_codec.encode(k), value_codec.encode(v)], -1)
    slot_bytes = kv_cache.shape[-1]
    if packed.shape[-1] < slot_bytes:
        packed = torch.nn.functional.pad(packed, (0, slot_bytes - packed.shape[-1]))
    block_size = kv_cache.shape[2]
    kv_cache[slots // block_size, :, slots % block_size] = packed


def _gather_pages(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``[B, nb]`` block ids -> the packed tokens ``[B, H, nb * block_size, slot_bytes]``."""
    pages = kv_cache[block_ids.clamp_min(0).long()]  # [B, nb, H, bs, C]
    b, nb, h, bs, c = pages.shape
    return pages.permute(0, 2, 1, 3, 4).reshape(b, h, nb * bs, c)


def attend_context(state: OnlineSoftmax, prepared_q, key_codec: Codec, value_codec: Codec,
                   kv_cache: torch.Tensor, block_table: torch.Tensor,
                   context_lens: torch.Tensor, scale: float,
                   chunk_tokens: int = CONTEXT_CHUNK_TOKENS,
                   row_limits: torch.Tensor | None = None,
                   row_starts: torch.Tensor | None = None) -> None:
    """Fold the packed context ``[0, context_lens[b])`` of each row group into ``state``, or
    with ``row_limits`` ``[B, M]`` the packed keys ``[0, row_limits[b, m])`` of each row
    (``context_lens`` must then cover every row's limit); ``row_starts`` ``[B, M]``: each
    row's first visible key (a sliding window), the blocks before every row's start are
    not read (vLLM may have freed them)."""
    block_size = kv_cache.shape[2]
    max_context = int(context_lens.max()) if context_lens.numel() else 0
    chunk_blocks = max(1, chunk_tokens // block_size)
    key_bytes = key_codec.nbytes
    num_blocks = -(-max_context // block_size)
    lowest = int(row_starts.min()) // block_size if row_starts is not None and \
        row_starts.numel() else 0
    for first in range(lowest, num_blocks, chunk_blocks):
        pages = _gather_pages(kv_cache, block_table[:, first:min(first + chunk_blocks, num_blocks)])
        positions = first * block_size + torch.arange(pages.shape[2], device=pages.device)
        visible = positions.unsqueeze(0) < context_lens.unsqueeze(1).to(pages.device)  # [B, N]
        scores = key_codec.scores(prepared_q, pages[..., :key_bytes]) * scale
        row_visible = visible[:, None, None, :]
        if row_limits is not None:  # [B, 1, M, N]
            row_visible = row_visible & (positions < row_limits[..., None])[:, None]
        if row_starts is not None:
            row_visible = row_visible & (positions >= row_starts[..., None])[:, None]
            # Freed blocks may hold anything: no value before a group's first start is read.
            visible = visible & (positions >= row_starts.min(-1).values[:, None])
        scores = scores.masked_fill(~row_visible, float("-inf"))
        values = value_codec.decode(pages[..., key_bytes:key_bytes + value_codec.nbytes])
        # Unwritten slots hold arbitrary bytes (fresh blocks are not zeroed): 0 * NaN = NaN.
        values = values.masked_fill(~visible[:, None, :, None], 0.0)
        state.update(scores, values)


def attend_exact(state: OnlineSoftmax, q_rows: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, visible: torch.Tensor, value_codec: Codec,
                 scale: float) -> None:
    """Exact attention of query rows ``[B, H, M, D]`` to unquantized K/V ``[B, H, N, D]``;
    ``visible`` broadcasts to ``[B, H, M, N]``. Values go to the value codec's domain (an
    exact linear map) so they share the accumulator with the packed context."""
    scores = (q_rows @ key.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    state.update(scores, value_codec.to_codec_domain(value.float()))


def attend_fresh(state: OnlineSoftmax, q_rows: torch.Tensor, row_tokens: torch.Tensor,
                 key: torch.Tensor, value: torch.Tensor, value_codec: Codec,
                 scale: float, exact_from: torch.Tensor | None = None) -> None:
    """Causal exact attention of query rows to the step's own K/V ``[B, H, Tq, D]``;
    row_tokens ``[M]``: the fresh-token index of each row; ``exact_from`` ``[M]`` (optional):
    each row's first fresh token read exactly (those before it were read packed, or lie
    before its sliding window)."""
    fresh = torch.arange(key.shape[2], device=key.device).unsqueeze(0)
    visible = fresh <= row_tokens.unsqueeze(1)
    if exact_from is not None:
        visible &= fresh >= exact_from.unsqueeze(1)
    attend_exact(state, q_rows, key, value, visible, value_codec, scale)


def attend_recent(state: OnlineSoftmax, q_rows: torch.Tensor, recent: RecentKV | None,
                  value_codec: Codec, scale: float,
                  exact_from: torch.Tensor | None = None) -> None:
    """The exact recent window (older than every fresh token, so visible to every row), or
    with ``exact_from`` ``[M]`` only its entries from that index on (relative to the
    window's end: -3 = its last three tokens)."""
    if recent is not None and bool((recent.lens > 0).any()):
        visible = recent.visible()[:, None, None, :]
        if exact_from is not None:
            w = torch.arange(recent.keys.shape[2], device=recent.keys.device)
            from_end = w - recent.lens[:, None]  # [B, W]
            visible = visible & (from_end[:, None, None, :] >= exact_from[None, None, :, None])
        attend_exact(state, q_rows, recent.keys, recent.values, visible, value_codec, scale)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[T, Hq, D]`` -> ``[H, T * g, D]`` with rows ordered (token, head-in-group)."""
    t, hq, d = q.shape
    g = hq // num_kv_heads
    return q.view(t, num_kv_heads, g, d).permute(1, 0, 2, 3).reshape(num_kv_heads, t * g, d)


def ungroup_output(o: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[H, T * g, D]`` -> ``[T, Hq, D]`` (inverse of ``group_queries``)."""
    h, rows, d = o.shape
    g = rows // num_tokens
    return o.view(h, num_tokens, g, d).permute(1, 0, 2, 3).reshape(num_tokens, h * g, d)


def window_from_ring(first, ring=None, window_slots=None,
                     window_exact=None) -> RecentKV | None:
    """The exact window of a batch of rows, gathered (None: no window) from the layer's ring
    ``ring=(ring_k, ring_v)`` for rows with ring slots ``window_slots`` and ``window_exact``
    exact tokens starting at position ``first`` (the packed context length). The Triton
    kernels take the same keywords and read the ring in place."""
    if ring is None:
        return None
    device = ring[0].device

    def rows(x):
        return torch.as_tensor(x, device=device).reshape(-1)

    return gather_ring(*ring, rows(window_slots), rows(first), rows(window_exact))


def decode_attention(query, key, value, kv_cache, block_table, context_lens, key_codec,
                     value_codec, scale, *, ring=None, window_slots=None, window_exact=None,
                     first_keys=None):
    """One new token per request: query ``[B, Hq, D]``, key/value ``[B, H, D]``.

    ``context_lens`` counts the packed tokens read from blocks; the exact window (``ring=``,
    ``window_slots=``, ``window_exact=``: see ``window_from_ring``), if given, holds the tokens
    that follow them, just before the new token; ``first_keys`` ``[B]`` (a sliding window):
    each request's first visible key, earlier blocks are not read. Returns ``[B, Hq, D]``
    float32.
    """
    recent = window_from_ring(context_lens, ring, window_slots, window_exact)
    b, hq, d = query.shape
    h = key.shape[1]
    q_rows = query.float().view(b, h, hq // h, d)  # [B, H, g, D]
    state = OnlineSoftmax(q_rows.shape[:-1], d, query.device)
    starts = None if first_keys is None else torch.as_tensor(
        first_keys, device=query.device).reshape(b, 1).expand(b, hq // h)
    attend_context(state, key_codec.prepare_queries(q_rows), key_codec, value_codec, kv_cache,
                   block_table, context_lens, scale, row_starts=starts)
    attend_recent(state, q_rows, recent, value_codec, scale)
    attend_fresh(state, q_rows, torch.zeros(hq // h, dtype=torch.long, device=query.device),
                 key.unsqueeze(2), value.unsqueeze(2), value_codec, scale)
    return value_codec.finish_output(state.result()).reshape(b, hq, d)


def prefill_attention(query, key, value, kv_cache, block_row, context_len, key_codec,
                      value_codec, scale, *, tile_tokens: int = QUERY_TILE_TOKENS, ring=None,
                      window_slots=None, window_exact=None, packed_limits=None,
                      first_keys=None):
    """One request's chunk of Tq tokens after ``context_len`` packed tokens (and, if given,
    the exact window that follows them: ``ring=`` with one row's ``window_slots`` /
    ``window_exact``). The chunk attends to itself exactly, unless ``packed_limits`` ``[Tq]``
    gives each token's L (``vllm_kvq.exactness``): keys before position L are then read
    packed (the chunk's own slots included: they are stored before attention), the window
    entries and chunk tokens from L on exactly.

    ``first_keys`` ``[Tq]`` (a sliding window): each token's first visible key.

    query ``[Tq, Hq, D]``, key/value ``[Tq, H, D]``, block_row ``[num_blocks]``.
    Returns ``[Tq, Hq, D]`` float32.
    """
    recent = window_from_ring([int(context_len)], ring, window_slots, window_exact)
    return _prefill_one(query, key, value, kv_cache, block_row, context_len, key_codec,
                        value_codec, scale, recent, tile_tokens, packed_limits, first_keys)


def _prefill_one(query, key, value, kv_cache, block_row, context_len, key_codec, value_codec,
                 scale, recent: RecentKV | None, tile_tokens: int, packed_limits,
                 first_keys=None):
    """``prefill_attention`` with its window gathered (``[1, H, W, D]``, or None)."""
    tq, hq, d = query.shape
    h = key.shape[1]
    g = hq // h
    fresh_k = key.transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
    fresh_v = value.transpose(0, 1).unsqueeze(0)
    # Position of the chunk's first token: the packed context plus the window before it.
    chunk_start = int(context_len) + (int(recent.lens[0]) if recent is not None else 0)
    if packed_limits is not None:
        packed_limits = torch.as_tensor(packed_limits, device=query.device).reshape(-1)
    if first_keys is not None:
        first_keys = torch.as_tensor(first_keys, device=query.device).reshape(-1)
    out = torch.empty(tq, hq, d, device=query.device)
    for start in range(0, tq, tile_tokens):
        stop = min(tq, start + tile_tokens)
        q_rows = group_queries(query[start:stop].float(), h).unsqueeze(0)  # [1, H, t*g, D]
        state = OnlineSoftmax(q_rows.shape[:-1], d, query.device)
        row_limits = exact_from = None
        context = int(context_len)
        if packed_limits is not None:
            row_limits = packed_limits[start:stop].repeat_interleave(g)  # [t*g]
            exact_from = row_limits - chunk_start  # relative to the chunk's first token
            context = int(row_limits.max())
        row_starts = None
        if first_keys is not None:
            row_starts = first_keys[start:stop].repeat_interleave(g)  # [t*g]
            # Exact keys (window entries and chunk tokens) before a row's window are unseen.
            first_exact = row_starts - chunk_start
            exact_from = first_exact if exact_from is None else \
                torch.maximum(exact_from, first_exact)
        if context > 0 and (row_starts is None or int(row_starts.min()) < context):
            attend_context(state, key_codec.prepare_queries(q_rows), key_codec, value_codec,
                           kv_cache, block_row.unsqueeze(0),
                           torch.tensor([context], device=query.device), scale,
                           row_limits=None if row_limits is None else row_limits[None],
                           row_starts=None if row_starts is None else row_starts[None])
        attend_recent(state, q_rows, recent, value_codec, scale, exact_from)
        row_tokens = torch.arange(start, stop, device=query.device).repeat_interleave(g)
        attend_fresh(state, q_rows, row_tokens, fresh_k[:, :, :stop], fresh_v[:, :, :stop],
                     value_codec, scale, exact_from)
        out[start:stop] = ungroup_output(value_codec.finish_output(state.result())[0],
                                         stop - start)
    return out


def prefill_attention_varlen(query, key, value, kv_cache, block_table, query_start_loc,
                             context_lens, key_codec, value_codec, scale, *, ring=None,
                             window_slots=None, window_exact=None, packed_limits=None,
                             first_keys=None, plan=None):
    """Every prefill request of a step: request r owns rows
    ``query_start_loc[r]:query_start_loc[r + 1]`` (host ints) of query ``[T, Hq, D]`` and
    key/value ``[T, H, D]``, reads ``block_table[r]`` and has ``context_lens[r]`` earlier
    packed tokens, followed by its exact window if given (``ring=``, ``window_slots=``,
    ``window_exact=``, see ``window_from_ring``);
    ``packed_limits`` ``[T]`` (optional): each token's L, and ``first_keys`` ``[T]`` (a
    sliding window): each token's first visible key, see ``prefill_attention``. ``plan``
    (the Triton kernels' step plan) is not needed here. Returns ``[T, Hq, D]`` float32."""
    recent = window_from_ring(context_lens, ring, window_slots, window_exact)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for r in range(len(query_start_loc) - 1):
        s, e = query_start_loc[r], query_start_loc[r + 1]
        out[s:e] = _prefill_one(query[s:e], key[s:e], value[s:e], kv_cache, block_table[r],
                                int(context_lens[r]), key_codec, value_codec, scale,
                                recent.row(r) if recent is not None else None,
                                QUERY_TILE_TOKENS,
                                None if packed_limits is None else packed_limits[s:e],
                                None if first_keys is None else first_keys[s:e])
    return out
