"""Store kernel vs ``paged_attention.store_slots`` (the torch reference), byte for byte.

Per-field tolerances and the inputs redrawn before storing: field_checks.py. Padding slots
(-1) must leave their slot untouched; pad bytes are zero.
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.kernels import api

from .field_checks import check_field, redraw_ambiguous_rows
from .helpers import FORMAT_NAMES, PRESET_NAMES, codecs, junk_cache


def _run_store(name: str, head_size: int, seed: int):
    dtype = random.choice([torch.bfloat16, torch.float16])
    h = random.randint(1, 3)
    bs = random.choice([16, 32, 64, 128])
    t = random.randrange(1, 40, 2)  # odd token counts
    num_blocks = -(-t // bs) + random.randint(0, 2)
    fmt, kc, vc = codecs(name, head_size, h, dtype)
    sb = fmt.slot_bytes(head_size)
    slots = torch.randperm(num_blocks * bs)[:t]
    pad = torch.rand(t) < 0.2
    slots[pad] = -1
    key = (torch.randn(t, h, head_size) * random.choice([0.5, 1.0, 4.0])).to(dtype)
    value = torch.randn(t, h, head_size).to(dtype)
    if random.random() < 0.5:  # non-contiguous views, as vLLM's qkv split produces
        key = torch.randn(t, h, 2 * head_size).to(dtype)[..., :head_size]
    redraw_ambiguous_rows(key, kc)
    redraw_ambiguous_rows(value, vc)
    junk = junk_cache(num_blocks, h, bs, sb)
    want, got = junk.clone(), junk.clone()
    ref.store_slots(key, value, want, slots, kc, vc)
    api.store_slots(key, value, got, slots, kc, vc)

    what = f"{name} D={head_size} H={h} bs={bs} T={t} {dtype} seed={seed}"
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_g = got.permute(0, 2, 1, 3).reshape(num_blocks * bs, h, sb)
    flat_w = want.permute(0, 2, 1, 3).reshape(num_blocks * bs, h, sb)
    flat_j = junk.permute(0, 2, 1, 3).reshape(num_blocks * bs, h, sb)
    assert torch.equal(flat_g[~written], flat_j[~written]), f"{what}: touched a foreign slot"
    valid = slots >= 0
    if not valid.any():
        return
    g = flat_g[slots[valid]].reshape(-1, sb)
    w = flat_w[slots[valid]].reshape(-1, sb)
    kb, vb = kc.nbytes, vc.nbytes
    assert torch.equal(g[:, kb + vb:], torch.zeros_like(g[:, kb + vb:])), f"{what}: pad bytes"
    keys = key[valid].reshape(-1, head_size)
    check_field(kc, g[:, :kb], w[:, :kb], f"{what} keys", keys)
    check_field(vc, g[:, kb:kb + vb], w[:, kb:kb + vb], f"{what} values")


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_store_presets(name, head_size, seed):
    _run_store(name, head_size, seed)


@pytest.mark.parametrize("name", [n for n in FORMAT_NAMES if n not in PRESET_NAMES])
def test_store_custom_formats(name, seed):
    _run_store(name, random.choice([64, 128]), seed)


def test_store_all_padding(seed):
    fmt, kc, vc = codecs("k4v2", 64, 2)
    cache = junk_cache(2, 2, 16, fmt.slot_bytes(64))
    before = cache.clone()
    k = torch.randn(5, 2, 64).to(torch.bfloat16)
    api.store_slots(k, k, cache, torch.full((5,), -1), kc, vc)
    assert torch.equal(cache, before)
