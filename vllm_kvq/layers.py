"""Layer and head identity: which layer an attention module is, and which global KV heads a
tensor-parallel rank's attention layer holds.

Everything random or per-layer in KVQ is keyed by (layer index, global KV-head index), so a
head is quantized identically at any tensor-parallel size, including when TP > KV heads and
heads are replicated across ranks, and the per-layer policy finds the same layer on every
rank.
"""

import re

from vllm.distributed import parallel_state

from .formats.head_layout import rank_kv_heads

_INTEGER = re.compile(r"^\d+$")


def _name_index(layer_name: str) -> int | None:
    """The one integer component of a dotted module name ("model.layers.7.self_attn.attn"
    -> 7), or None when it has none or several."""
    ints = [int(part) for part in layer_name.split(".") if _INTEGER.match(part)]
    return ints[0] if len(ints) == 1 else None


def _model_layer_indices(vllm_config) -> dict[str, int]:
    """Every attention layer of the model built in this process, keyed by name: the decoder
    layer index its name carries when every name carries exactly one (distinct) integer --
    the index policies and the allocator count with, as vLLM does -- else its position in
    construction order (vLLM's static forward context), the same on every rank because every
    rank builds the same model."""
    names = list(vllm_config.compilation_config.static_forward_context)
    indices = [_name_index(n) for n in names]
    if None not in indices and len(set(indices)) == len(indices):
        return dict(zip(names, indices))
    return {n: i for i, n in enumerate(names)}


def layer_index(layer_name: str | None, vllm_config, uniform: bool) -> int:
    """KVQ's index of one attention layer (see ``_model_layer_indices``). A layer that is not
    part of a built model (engine-free harnesses, e.g. vLLM's backend tests, which name it
    "placeholder" or not at all) is the integer of its name, or layer 0 when every layer has
    the same format (``uniform``): its constants are then still deterministic, and store and
    read agree because both use this index."""
    if vllm_config is not None and layer_name is not None:
        known = _model_layer_indices(vllm_config)
        if layer_name in known:
            return known[layer_name]
    index = None if layer_name is None else _name_index(layer_name)
    if index is not None:
        return index
    if uniform:
        return 0
    raise ValueError(f"KVQ cannot tell which layer {layer_name!r} is (its name carries no "
                     "single layer index and it is not part of the model), but the KVQ policy "
                     "gives layers different formats; name the layer with its index, e.g. "
                     "'model.layers.3.self_attn.attn'.")


def _tp_rank_and_size() -> tuple[int, int]:
    if parallel_state._TP is None:  # engine-free use (tests, benchmarks): a single rank
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def global_kv_heads(num_local_kv_heads: int, total: int) -> list[int]:
    """Global indices of this rank's KV heads (``total`` = the model's KV heads)."""
    rank, size = _tp_rank_and_size()
    heads = rank_kv_heads(rank, size, total)
    if len(heads) != num_local_kv_heads:
        raise ValueError(f"KVQ expected {len(heads)} KV heads on TP rank {rank} of {size} "
                         f"(the model has {total}), but the layer has {num_local_kv_heads}")
    return heads
