"""The attention ops on the compiled CPU kernels, with ``vllm_kvq.paged_attention``'s
signatures: ``store_slots``, ``decode_attention``, ``prefill_attention_varlen``.

Each call is one C++ op over the whole batch (no per-request Python loop): the packed
context, the exact window (read in place from the ring) and the step's fresh tokens, merged in
one online softmax per query row. The backend calls ``store_groups`` and ``attend_groups``:
one call per layer for all its head groups (``KernelGroups``: a per-head policy's layer stores
several formats), reading the layer's queries, K/V and ring in place and writing its output.
``gap`` says which layer formats they cannot run; those layers use the torch path
(``vllm_kvq.dispatch``).
"""

import functools

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


def parallel_threads() -> int:
    """How many threads the kernels' parallel loops run on (``torch.get_num_threads()``)."""
    return int(torch.ops.kvq_cpu.parallel_threads()) if load() is None else 0


def _spec_field(spec, offset: int) -> list[int]:
    if isinstance(spec, Raw):
        return [RAW_KIND, 16, 0, offset, 0]
    return [INT_KIND, spec.bits, spec.group_size, offset, int(spec.rotate)]


class KernelGroups:
    """A layer's head groups as one kernel call takes them, built once per layer: for each
    group its KV heads ``[start, stop)``, where its slots lie in a block (``offset`` bytes per
    block-token, ``slot_bytes`` each), its key and value fields and rotation signs
    (csrc/kvq_cpu.cpp, ``GroupSpec``). One call stores or attends every group of the layer:
    per-head policies cost no call per group, and no copies of each group's heads."""

    def __init__(self, groups: list[tuple[int, int, int, int, Codec, Codec]]):
        self.ints: list[int] = []
        self.signs: list[torch.Tensor | None] = []
        for start, stop, offset, slot_bytes, key_codec, value_codec in groups:
            self.ints += [start, stop, offset, slot_bytes,
                          *_spec_field(key_codec.spec, 0),
                          *_spec_field(value_codec.spec, key_codec.nbytes)]
            self.signs += [getattr(key_codec, "signs", None),
                           getattr(value_codec, "signs", None)]

    @classmethod
    def uniform(cls, kv_cache: torch.Tensor, key_codec: Codec,
                value_codec: Codec) -> "KernelGroups":
        """Every head of ``kv_cache`` ([blocks, H, block size, slot bytes]) in one format."""
        return cls([(0, kv_cache.shape[1], 0, kv_cache.shape[3], key_codec, value_codec)])


def store_slots(key, value, kv_cache, slot_mapping, key_codec: Codec,
                value_codec: Codec) -> None:
    store_groups(key, value, kv_cache, slot_mapping,
                 KernelGroups.uniform(kv_cache, key_codec, value_codec))


def store_groups(key, value, kv_cache, slot_mapping, groups: KernelGroups) -> None:
    """Store the layer's K/V ``[T, H, D]`` (any token and head strides) into every group."""
    torch.ops.kvq_cpu.store(key, value, kv_cache, slot_mapping, groups.ints, groups.signs)


def write_ring(ring_k, ring_v, key, value, token_slots, token_positions) -> None:
    """``vllm_kvq.window.write_ring`` in one C++ call (the same writes: token t's K/V at ring
    index ``token_positions[t] % R`` of slot ``token_slots[t]``, -1 the spare slot)."""
    torch.ops.kvq_cpu.write_ring(ring_k, ring_v, key.to(ring_k.dtype), value.to(ring_v.dtype),
                                 token_slots, token_positions)


def _int32(x, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.int32, device=device).contiguous()


def _query(query, key) -> torch.Tensor:
    """The kernel reads queries in the K/V dtype (converting a row at a time) or in float32."""
    return query if query.dtype in (key.dtype, torch.float32) else query.float()


def attend_groups(query, key, value, kv_cache, block_table, context_lens, query_start,
                  groups: KernelGroups, scale, out, *, ring=None, window_slots=None,
                  window_exact=None, packed_limits=None, first_keys=None,
                  split_tokens: int = 0) -> torch.Tensor:
    """Attention of every query row of ``groups``' heads, written into ``out`` ([T, Hq, D],
    float32 or the K/V dtype, any token and head strides; rows of other heads untouched).
    ``query_start``: each request's first row (the rows of a decode batch: 0, 1, ..., B)."""
    device = query.device
    ring_k, ring_v = ring if ring is not None else (None, None)
    window = (None, None) if ring is None else (_int32(window_slots, device),
                                                 _int32(window_exact, device))
    torch.ops.kvq_cpu.attend(
        _query(query, key), key, value, kv_cache, _int32(block_table, device),
        _int32(context_lens, device), _int32(query_start, device),
        None if packed_limits is None else _int32(packed_limits, device),
        None if first_keys is None else _int32(first_keys, device), ring_k, ring_v,
        *window, groups.ints, groups.signs, float(scale), int(split_tokens), out)
    return out


@functools.lru_cache(maxsize=256)
def decode_starts(batch: int) -> torch.Tensor:
    """The first row of each of ``batch`` decode requests (one row each): 0, 1, ..., batch.
    Read-only: shared by every call with this batch."""
    return torch.arange(batch + 1, dtype=torch.int32)


def _float32_like(query) -> torch.Tensor:
    """A float32 output for ``paged_attention``'s signatures (it returns float32)."""
    return torch.empty(query.shape, dtype=torch.float32, device=query.device)


def decode_attention(query, key, value, kv_cache, block_table, context_lens, key_codec,
                     value_codec, scale, *, ring=None, window_slots=None, window_exact=None,
                     first_keys=None, split_tokens: int = 0):
    """``paged_attention.decode_attention``; ``split_tokens`` (tests): packed tokens per
    part of a context (0: chosen from the batch and the thread count)."""
    return attend_groups(query, key, value, kv_cache, block_table, context_lens,
                         decode_starts(query.shape[0]),
                         KernelGroups.uniform(kv_cache, key_codec, value_codec), scale,
                         _float32_like(query), ring=ring, window_slots=window_slots,
                         window_exact=window_exact, first_keys=first_keys,
                         split_tokens=split_tokens)


def prefill_attention_varlen(query, key, value, kv_cache, block_table, query_start_loc,
                             context_lens, key_codec, value_codec, scale, *, ring=None,
                             window_slots=None, window_exact=None, packed_limits=None,
                             first_keys=None, plan=None, split_tokens: int = 0):
    """``paged_attention.prefill_attention_varlen`` (``plan``: the Triton kernels' step
    plan, not needed here)."""
    return attend_groups(query, key, value, kv_cache, block_table, context_lens,
                         query_start_loc, KernelGroups.uniform(kv_cache, key_codec, value_codec),
                         scale, _float32_like(query), ring=ring, window_slots=window_slots,
                         window_exact=window_exact, packed_limits=packed_limits,
                         first_keys=first_keys, split_tokens=split_tokens)
