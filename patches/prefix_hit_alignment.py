"""Shorten prefix-cache hits to a multiple of KVQ's exact span.

KVQ's exact window never reaches across a multiple of its span S (``vllm_kvq/exactness.py``),
so that a request resuming after a prefix-cache hit reads what its cold run read. vLLM's hits
land on block boundaries; where S is larger than a block (a window longer than an eighth of
a block), a hit must be cut back to a multiple of S, or the tokens after it would read
packed what the cold run read exactly. This wraps ``Scheduler._get_local_prefix_cache_hit``
(the scheduler's one local lookup) and drops the hit's blocks past the last multiple of S;
the dropped tokens are recomputed. ``alignment(vllm_config)`` (given to ``apply``) returns
S in tokens, or None where hits need no change (another backend, S equal to the block size);
the scheduler asks once.
"""

import inspect
from collections.abc import Callable
from typing import Any

from . import VLLMChangedError, check_parameters, wrap

# Read by the wrapper, so a later apply() swaps it without wrapping again.
_alignment: Callable[[Any], int | None] | None = None
_CACHED = "_kvq_hit_alignment"


def _target():
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


def check() -> None:
    scheduler = _target()
    # 0.33 adds an optional max_cache_hit_length, forwarded as given
    check_parameters(scheduler._get_local_prefix_cache_hit, ["self", "request"], __name__,
                     "Scheduler._get_local_prefix_cache_hit", exact=False)
    if "self.vllm_config = vllm_config" not in inspect.getsource(scheduler.__init__):
        raise VLLMChangedError("Scheduler.__init__ no longer keeps self.vllm_config; "
                               "patches/prefix_hit_alignment.py must be updated.")
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

    if "blocks" not in KVCacheBlocks.__dataclass_fields__:
        raise VLLMChangedError("KVCacheBlocks lost its blocks field; "
                               "patches/prefix_hit_alignment.py must be updated.")


def apply(alignment: Callable[[Any], int | None]) -> None:
    """``alignment(vllm_config)``: tokens every prefix-cache hit must be a multiple of, or
    None to leave hits as vLLM finds them."""
    global _alignment
    _alignment = alignment
    wrap(_target(), "_get_local_prefix_cache_hit", _aligning)


def aligned_hit(blocks, num_tokens: int, multiple: int):
    """The hit ``(blocks, num_tokens)`` cut to the largest multiple of ``multiple``: every
    KV cache group keeps the blocks of the tokens it keeps (its blocks cover the hit evenly)."""
    keep = num_tokens - num_tokens % multiple
    if keep == num_tokens:
        return blocks, num_tokens
    groups = tuple(list(group[:len(group) * keep // num_tokens]) for group in blocks.blocks)
    return type(blocks)(groups), keep


def _aligning(original):
    def _get_local_prefix_cache_hit(self, request, *args, **kwargs):
        blocks, num_tokens, shared_prefix_boundary, diverged = original(self, request, *args,
                                                                        **kwargs)
        if not hasattr(self, _CACHED):
            setattr(self, _CACHED, _alignment(self.vllm_config))
        multiple = getattr(self, _CACHED)
        if multiple and num_tokens % multiple:
            blocks, num_tokens = aligned_hit(blocks, num_tokens, multiple)
            if num_tokens == 0:
                blocks = self.kv_cache_manager.empty_kv_cache_blocks
        return blocks, num_tokens, shared_prefix_boundary, diverged

    return _get_local_prefix_cache_hit
