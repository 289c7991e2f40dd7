"""Head identity: which global KV heads a tensor-parallel rank's attention layer holds.

Everything random or per-layer in KVQ is keyed by (layer index, global KV-head index), so a
head is quantized identically at any tensor-parallel size, including when TP > KV heads and
heads are replicated across ranks.
"""

from vllm.distributed import parallel_state


def _tp_rank_and_size() -> tuple[int, int]:
    if parallel_state._TP is None:  # engine-free use (tests, benchmarks): a single rank
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def global_kv_heads(num_local_kv_heads: int, total: int) -> list[int]:
    """Global indices of this rank's KV heads (``total`` = the model's KV heads)."""
    rank, size = _tp_rank_and_size()
    if size <= total:
        return [rank * num_local_kv_heads + h for h in range(num_local_kv_heads)]
    # Replicated heads: ranks are split into `total` equal groups, one head each.
    return [rank // (size // total)]
