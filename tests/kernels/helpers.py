"""Shared builders for the kernel tests: codecs, caches with junk, filled paged contexts."""

import random

import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.config import PRESETS
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
# planes at aligned, misaligned and odd offsets.
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
