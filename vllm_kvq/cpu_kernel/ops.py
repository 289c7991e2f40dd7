"""The attention ops on the compiled CPU kernels, with ``vllm_kvq.paged_attention``'s
signatures: ``store_slots``, ``decode_attention``, ``prefill_attention_varlen``.

Each call is one C++ op over the whole batch (no per-request Python loop): the packed
context, the exact window (read in place from the ring) and the step's fresh tokens, merged in
one online softmax per query row. ``gap`` says which layer formats they cannot run; those
layers use the torch path (``vllm_kvq.dispatch``).
"""

import torch

from ..formats import Codec, LayerFormat
from ..formats.int_group import IntGroup
from ..formats.raw import Raw
from ..formats.registry import is_pow2
from .build import load

MAX_HEAD = 256  # csrc/kvq_cpu.cpp: MAX_HEAD
RAW_KIND, INT_KIND = 0, 1


def gap(fmt: LayerFormat, head_size: int, dtype) -> str | None:
    """Why the CPU kernels cannot run this layer format, or None if they can."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"model dtype {dtype} (the kernels read bfloat16 or float16)"
    if head_size > MAX_HEAD or head_size % 8:
        return f"head size {head_size}"
    for role, spec in (("key", fmt.key), ("value", fmt.value)):
        if type(spec) not in (Raw, IntGroup):
            return f"{spec.describe()} {role}s (the CPU kernels read integer and 16-bit fields)"
        if isinstance(spec, IntGroup) and spec.rotate and not is_pow2(head_size):
            return f"rotated {role}s at head size {head_size} (dense, not Hadamard, rotations)"
    return load()


def int_dot_keys(key_spec, head_size: int) -> bool:
    """Whether the kernels score these keys with integer dots (the query in three int8 digits
    per key group: AVX-512 VNNI hosts, codes of <= 4 bits; csrc/kvq_cpu.cpp, "integer key
    dots"), rather than with float32 dots."""
    if type(key_spec) is not IntGroup or load() is not None:
        return False
    return bool(torch.ops.kvq_cpu.int_dot_keys(_spec_field(key_spec, 0), head_size))


def amx_prompts() -> bool:
    """Whether prompt chunks' tile products run on AMX-BF16 (an AMX host that grants the
    process its tile state, ``VLLM_KVQ_CPU_AMX`` not 0)."""
    return load() is None and bool(torch.ops.kvq_cpu.amx_prompts())


def _field(codec: Codec, offset: int) -> list[int]:
    return _spec_field(codec.spec, offset)


def _spec_field(spec, offset: int) -> list[int]:
    if isinstance(spec, Raw):
        return [RAW_KIND, 16, 0, offset, 0]
    return [INT_KIND, spec.bits, spec.group_size, offset, int(spec.rotate)]


def _fields(key_codec: Codec, value_codec: Codec):
    signs = (getattr(key_codec, "signs", None), getattr(value_codec, "signs", None))
    return _field(key_codec, 0), _field(value_codec, key_codec.nbytes), signs


def store_slots(key, value, kv_cache, slot_mapping, key_codec: Codec,
                value_codec: Codec) -> None:
    kf, vf, (ks, vs) = _fields(key_codec, value_codec)
    torch.ops.kvq_cpu.store(key, value, kv_cache, slot_mapping, kf, vf, ks, vs)


def _int32(x, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.int32, device=device).contiguous()


def _query(query, key) -> torch.Tensor:
    """The kernel reads queries in the K/V dtype (converting a row at a time) or in float32."""
    return (query if query.dtype == key.dtype else query.float()).contiguous()


def _attend(query, key, value, kv_cache, block_table, context_lens, query_start, key_codec,
            value_codec, scale, ring, window_slots, window_exact, packed_limits, first_keys,
            split_tokens: int = 0) -> torch.Tensor:
    device = query.device
    kf, vf, (ks, vs) = _fields(key_codec, value_codec)
    out = torch.empty(query.shape, dtype=torch.float32, device=device)
    ring_k, ring_v = ring if ring is not None else (None, None)
    window = (None, None) if ring is None else (_int32(window_slots, device),
                                                 _int32(window_exact, device))
    torch.ops.kvq_cpu.attend(
        _query(query, key), key, value, kv_cache, _int32(block_table, device),
        _int32(context_lens, device), _int32(query_start, device),
        None if packed_limits is None else _int32(packed_limits, device),
        None if first_keys is None else _int32(first_keys, device), ring_k, ring_v,
        *window, kf, vf, ks, vs, float(scale), int(split_tokens), out)
    return out


def decode_attention(query, key, value, kv_cache, block_table, context_lens, key_codec,
                     value_codec, scale, *, ring=None, window_slots=None, window_exact=None,
                     first_keys=None, split_tokens: int = 0):
    """``paged_attention.decode_attention``; ``split_tokens`` (tests): packed tokens per
    part of a context (0: chosen from the batch and the thread count)."""
    b = query.shape[0]
    starts = torch.arange(b + 1, dtype=torch.int32)
    return _attend(query, key, value, kv_cache, block_table, context_lens, starts, key_codec,
                   value_codec, scale, ring, window_slots, window_exact, None, first_keys,
                   split_tokens)


def prefill_attention_varlen(query, key, value, kv_cache, block_table, query_start_loc,
                             context_lens, key_codec, value_codec, scale, *, ring=None,
                             window_slots=None, window_exact=None, packed_limits=None,
                             first_keys=None, plan=None, split_tokens: int = 0):
    """``paged_attention.prefill_attention_varlen`` (``plan``: the Triton kernels' step
    plan, not needed here)."""
    return _attend(query, key, value, kv_cache, block_table, context_lens, query_start_loc,
                   key_codec, value_codec, scale, ring, window_slots, window_exact,
                   packed_limits, first_keys, split_tokens)
