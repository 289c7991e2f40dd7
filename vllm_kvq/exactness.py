"""Which keys a query reads exactly and which through the packed blocks.

A query at position p reads the keys ``[0, L(p))`` from the packed blocks and the keys
``[L(p), p]`` exactly (the exact recent window's ring, then the step's own K/V). By default
L depends on the position alone,

    L(p) = p - min(R, p mod S)        R = the exact window ("window"), S = the exact span,

so an answer never depends on what the prefix cache held, how the prompt was cut into
prefill chunks, or what else shared the step. Why the window may not cross a span boundary:
a prefix-cache hit resumes a request at a boundary c, and the keys before c then exist only
as packed bytes; since L(p) >= floor(p / S) * S >= c for every p >= c, a request reads the
same bytes cold or cached. vLLM's hits land on block boundaries; S is a multiple of the
block size B, and ``patches/prefix_hit_alignment.py`` shortens every hit to a multiple of S.

The span (``exact_span``): the smallest multiple of B that is at least ``SPAN_PER_WINDOW``
windows. A window cut at span boundaries is shorter than R for the first R positions of every
span, so with S = B and R = B / 2 (64 tokens in vLLM's 128-token CPU blocks) half the
positions read fewer than R tokens exactly (SmolLM2's 5x policy lost 0.7 points of
perplexity to that: README, "The exact span"); with S >= 8R at most an eighth of the
positions do. The price is a coarser prefix cache: a hit loses up to S - 1 tokens, recomputed.
With the default 16-token window and 128-token blocks S = B: hits are vLLM's own.

With R = 0 only a token's own K/V is exact (past-only quantization, WKVQuant), and a
prompt's later tokens read its earlier ones packed, exactly what a request hitting the cache
reads. The builder computes L once per step for every prefill token
(``prefill_packed_limits``); decode rows need only the request-level cap on the window
(``window_cap``).

``prefill_exact`` (opt-in) restores the older chunk-level semantics: every query of a
prefill chunk reads the whole chunk (and the window before it) exactly, so a cold prompt
attends to itself in full precision, while a prefix-cache hit, or a chunk boundary, moves
tokens to the packed side and changes the answer. See README, "Cached or cold".
"""

import torch

SPAN_PER_WINDOW = 8  # the exact span covers at least this many windows


def exact_span(window: int, block_size: int) -> int:
    """S: the smallest multiple of ``block_size`` holding ``SPAN_PER_WINDOW`` windows (the
    block size itself without a window)."""
    return block_size * max(1, -(-SPAN_PER_WINDOW * window // block_size))


def window_cap(position: int, window: int, span: int) -> int:
    """Most context tokens just before ``position`` that its query may read exactly."""
    return min(window, position % span)


def packed_limits(positions: torch.Tensor, packed: torch.Tensor, window: int,
                  span: int) -> torch.Tensor:
    """L(p) of prefill tokens at ``positions``, never below their request's ``packed`` (the
    tokens before its exact window: what the ring does not hold is read packed, never
    skipped); elementwise over int64 tensors."""
    return torch.maximum(positions - torch.clamp(positions % span, max=window), packed)


def prefill_packed_limits(context_len: int, query_len: int, packed_len: int, window: int,
                          span: int) -> list[int]:
    """L(p) for one chunk's tokens p = context_len .. context_len + query_len - 1."""
    positions = torch.arange(context_len, context_len + query_len)
    return packed_limits(positions, torch.tensor(packed_len), window, span).tolist()


def prefix_hit_alignment(vllm_config) -> int | None:
    """Tokens every prefix-cache hit of this engine must be a multiple of: the exact span
    where it is longer than a block and the backend is KVQ, else None (vLLM's own hits)."""
    from .config import config_from_vllm

    backend = getattr(vllm_config.attention_config, "backend", None)
    if backend is None or backend.name != "KVQ":
        return None
    cfg = config_from_vllm(vllm_config)
    block_size = vllm_config.cache_config.block_size
    span = exact_span(cfg.window, block_size)
    return span if span > block_size and not cfg.prefill_exact else None
