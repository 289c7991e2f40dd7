"""Shared builders for the kernel tests: codecs, caches with junk, filled paged contexts."""

import random

import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.config import PRESETS
from vllm_kvq.exactness import prefill_packed_limits
from vllm_kvq.formats import LayerFormat, build_codecs, storage_format

PRESET_NAMES = list(PRESETS)

# Attention output tolerance by model dtype (absolute); derivation in test_decode.py.
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}


def check_attention(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> float:
    """A kernel's fp32 attention output vs the torch reference's, within TOL; returns the error."""
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and got.dtype == torch.float32, what
    assert torch.isfinite(got).all(), what
    assert err <= TOL[dtype], f"{what}: max err {err:.2e}"
    return err

# Formats off the preset list that reach the kernels' rarer paths: odd key sizes (value
# scales / raw values at odd byte offsets), value codes needing the unaligned-window wrap with
# small chunks, 1-bit and 8-bit codes, small and large groups, QJL without outliers, 3-bit
# planes at aligned, misaligned and odd offsets, slots that are 8-byte but not 16-byte multiples.
CUSTOM = {
    "k1g8r_v8g16": LayerFormat(storage_format("int", 1, 8, True), storage_format("int", 8, 16, False)),
    "qjl64o3_v2g32r": LayerFormat(storage_format("qjl", sketch_dim=64, outliers=3),
                                  storage_format("int", 2, 32, True)),
    "qjl128o0_raw": LayerFormat(storage_format("qjl", sketch_dim=128, outliers=0), storage_format("raw")),
    "qjl128o1_raw": LayerFormat(storage_format("qjl", sketch_dim=128, outliers=1), storage_format("raw")),
    "raw_v1g64r": LayerFormat(storage_format("raw"), storage_format("int", 1, 64, True)),
    "k2g16_v4g8": LayerFormat(storage_format("int", 2, 16, False), storage_format("int", 4, 8, True)),
    "k3g32_v3g16r": LayerFormat(storage_format("int", 3, 32, False), storage_format("int", 3, 16, True)),
    "qjl128o1_v3g32r": LayerFormat(storage_format("qjl", sketch_dim=128, outliers=1),
                                   storage_format("int", 3, 32, True)),
    # 56-byte slots at head size 64 (8-byte multiples): the value window's tail in 8-byte
    # chunks (a 16-byte one would leave the slot), 3-bit planes at byte 28
    "k4g64r_v2g64r": LayerFormat(storage_format("int", 4, 64, True), storage_format("int", 2, 64, True)),
    "k3g64r_v3g64r": LayerFormat(storage_format("int", 3, 64, True), storage_format("int", 3, 64, True)),
}
FORMAT_NAMES = PRESET_NAMES + list(CUSTOM)


def layer_format(name: str) -> LayerFormat:
    return PRESETS[name] if name in PRESETS else CUSTOM[name]


def codecs(preset: str, head_size: int, kv_heads: int, dtype=torch.bfloat16):
    """The format's codecs for ``kv_heads`` random global heads of a random layer/seed."""
    fmt = layer_format(preset)
    heads = random.sample(range(64), kv_heads)
    kc, vc = build_codecs(fmt, head_size, dtype, random.randrange(1 << 16),
                          random.randrange(64), heads)
    return fmt, kc, vc


def junk_cache(num_blocks: int, kv_heads: int, block_size: int, slot_bytes: int):
    """Blocks are not zeroed on allocation: start from random bytes (NaN/inf fp16 fields
    included), so kernels must mask every slot they do not own."""
    return torch.randint(0, 256, (num_blocks, kv_heads, block_size, slot_bytes),
                         dtype=torch.uint8)


def random_block_tables(batch: int, blocks_per_req: int, num_blocks: int):
    """Disjoint, shuffled physical blocks per request."""
    perm = torch.randperm(num_blocks)[:batch * blocks_per_req]
    return perm.view(batch, blocks_per_req).to(torch.int32)


def fill_context(cache, block_table, context_lens, kc, vc, d, dtype, key_scale=1.0):
    """Store random K/V (through the torch reference) at positions < context_lens[b]."""
    h, bs = cache.shape[1], cache.shape[2]
    for b, n in enumerate(context_lens):
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = block_table[b, pos // bs].long() * bs + pos % bs
        k = (torch.randn(n, h, d) * key_scale).to(dtype)
        v = torch.randn(n, h, d).to(dtype)
        ref.store_slots(k, v, cache, slots, kc, vc)


def random_query_lens(batch: int) -> tuple[list[int], list[int]]:
    """Per-request prefill lengths (single tokens and chunks of 2-40) and query_start_loc."""
    qlens = [random.choice([1, random.randint(2, 40)]) for _ in range(batch)]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    return qlens, qsl


JUNK = 255  # every byte 0xFF: fp16/bf16 fields NaN, codes at their maximum


def sliding_case(name: str, *, decode: bool, head_size: int, gqa: int, block_size: int,
                 dtype, past_only: bool = True, batch: int = 3, ring_size: int = 16):
    """A batch of a sliding-window layer as the backend hands it to the ops: each query at
    position p sees keys ``[p - W + 1, p]`` (``first_keys``); request r holds ``ctx[r]``
    tokens, the last ``exact[r]`` of them in its exact window (a ring of ``ring_size``), and
    every block wholly before its first query's window is swapped for one block of 0xFF
    bytes, as vLLM's sliding-window manager frees such blocks (reading one poisons the
    output with NaN). Returns (args, keywords, description) for ``decode_attention`` or
    ``prefill_attention_varlen`` of the reference and the kernels alike."""
    w = random.randint(ring_size + 1, 64)  # the model's window; KVQ's must be smaller
    h = random.randint(1, 2)
    ctx = [random.choice([random.randint(0, 30), random.randint(w, 220)]) for _ in range(batch)]
    exact = [min(ring_size, c, random.randint(0, ring_size)) for c in ctx]
    packed = [c - e for c, e in zip(ctx, exact)]
    qlens = [1] * batch if decode else [random.choice([1, random.randint(2, 70)])
                                         for _ in range(batch)]
    if not decode:  # one chunk longer than the window: its last rows drop its first tokens
        qlens[random.randrange(batch)] = random.randint(w, w + 40)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    per_req = -(-max(c + n for c, n in zip(ctx, qlens)) // block_size) + 1
    fmt, kc, vc = codecs(name, head_size, h, dtype)
    cache = junk_cache(batch * per_req + 2, h, block_size, fmt.slot_bytes(head_size))
    junk_block = cache.shape[0] - 1
    cache[junk_block] = JUNK
    table = random_block_tables(batch, per_req, junk_block)
    # every token up to the chunk's end is stored before attention (the chunk's own too)
    fill_context(cache, table, [c + n for c, n in zip(ctx, qlens)], kc, vc, head_size, dtype,
                 key_scale=2.0)
    first_keys = [max(0, c + j - w + 1) for c, n in zip(ctx, qlens) for j in range(n)]
    for r in range(batch):
        lowest = first_keys[qsl[r]]
        for b in range(per_req):
            if (b + 1) * block_size <= lowest:
                table[r, b] = junk_block
    t = qsl[-1]
    q = torch.randn(t, h * gqa, head_size).to(dtype)
    k = (torch.randn(t, h, head_size) * 2).to(dtype)
    v = torch.randn(t, h, head_size).to(dtype)
    ring = ((torch.randn(batch + 1, ring_size, h, head_size) * 2).to(dtype),
            torch.randn(batch + 1, ring_size, h, head_size).to(dtype))
    kw = dict(ring=ring, window_slots=torch.randperm(batch + 1)[:batch].to(torch.int32),
              window_exact=torch.tensor(exact, dtype=torch.int32),
              first_keys=torch.tensor(first_keys, dtype=torch.int32))
    lens = torch.tensor(packed, dtype=torch.int32)
    scale = head_size ** -0.5
    if decode:
        args = (q, k, v, cache, table, lens, kc, vc, scale)
    else:
        if past_only:
            limits = []
            for c, n, p in zip(ctx, qlens, packed):
                limits += list(prefill_packed_limits(c, n, p, ring_size, block_size))
            kw["packed_limits"] = torch.tensor(limits, dtype=torch.int32)
        args = (q, k, v, cache, table, qsl, lens, kc, vc, scale)
    what = (f"{name} W={w} D={head_size} g={gqa} H={h} bs={block_size} ctx={ctx} "
            f"exact={exact} Tq={qlens} past_only={past_only} {dtype}")
    return args, kw, what
