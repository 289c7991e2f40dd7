"""Which keys a query reads exactly and which through the packed blocks.

A query at position p reads the keys ``[0, L(p))`` from the packed blocks and the keys
``[L(p), p]`` exactly (the exact recent window's ring, then the step's own K/V). By default
L depends on the position alone,

    L(p) = p - min(R, p mod B)        R = the exact window ("window"), B = the block size,

so an answer never depends on what the prefix cache held, how the prompt was cut into
prefill chunks, or what else shared the step. Why the window may not cross a block
boundary: a prefix-cache hit resumes a request at a block boundary c, and the keys before c
then exist only as packed bytes; since L(p) >= floor(p / B) * B >= c for every p >= c, a
request reads the same bytes cold or cached. With R = 0 only a token's own K/V is exact
(past-only quantization, WKVQuant), and a prompt's later tokens read its earlier ones
packed, exactly what a request hitting the cache reads. The builder computes L once per
step for every prefill token (``prefill_packed_limits``); decode rows need only the
request-level cap on the window (``window_cap``).

``prefill_exact`` (opt-in) restores the older chunk-level semantics: every query of a
prefill chunk reads the whole chunk (and the window before it) exactly, so a cold prompt
attends to itself in full precision, while a prefix-cache hit, or a chunk boundary, moves
tokens to the packed side and changes the answer. See README, "Cached or cold".
"""

import torch


def window_cap(position: int, window: int, block_size: int) -> int:
    """Most context tokens just before ``position`` that its query may read exactly."""
    return min(window, position % block_size)


def packed_limits(positions: torch.Tensor, packed: torch.Tensor, window: int,
                  block_size: int) -> torch.Tensor:
    """L(p) of prefill tokens at ``positions``, never below their request's ``packed`` (the
    tokens before its exact window: what the ring does not hold is read packed, never
    skipped); elementwise over int64 tensors."""
    return torch.maximum(positions - torch.clamp(positions % block_size, max=window), packed)


def prefill_packed_limits(context_len: int, query_len: int, packed_len: int, window: int,
                          block_size: int) -> list[int]:
    """L(p) for one chunk's tokens p = context_len .. context_len + query_len - 1."""
    positions = torch.arange(context_len, context_len + query_len)
    return packed_limits(positions, torch.tensor(packed_len), window, block_size).tolist()
