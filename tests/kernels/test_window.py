"""Exact recent window in the Triton kernels vs the torch reference.

The kernels read the window straight from the layer's ring ``[slots, R, H, D]`` (merge kernel;
``ring=``, ``window_slots=``, ``window_exact=``); the reference takes the same keywords and
gathers the same tokens (``window.gather_ring``). Every batch mixes rows with no window, a
full window (exact = R), partial windows that wrap around the ring (first + exact crosses a
multiple of R) and, when the batch has room, a row without a ring slot (-1). Ring entries no
row may read hold large junk (keys x30, values 1e3), so an over-read shows up as garbage; the
packed context sits in a cache of random bytes, as in test_decode.py (same tolerances).
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.kernels import api

from .helpers import (FORMAT_NAMES, PRESET_NAMES, check_attention, codecs, fill_context,
                      junk_cache, random_block_tables, random_query_lens)


def _windows(batch: int, size: int, max_first: int):
    """Per row: (slot, first, exact). Row kinds cycle through no window, full window, a
    wrapping partial window and a random one (slot -1 when there is a spare row)."""
    kinds = ["wrap", "full", "none", "random"]
    random.shuffle(kinds)
    slots = random.sample(range(batch + 2), batch)
    rows = []
    for b in range(batch):
        kind = kinds[b % len(kinds)]
        if kind == "none":
            exact = 0
            first = random.randint(0, max_first)
            if b == batch - 1 and batch > 3:
                slots[b] = -1  # more requests than ring slots: reads packed only
        elif kind == "full":
            exact = size
            first = random.randint(0, max_first)
        elif kind == "wrap":  # [first, first + exact) crosses a multiple of R
            exact = random.randint(2, size)
            cross = size * random.randint(1, 3)
            first = max(0, cross - random.randint(1, exact - 1))
        else:
            exact = random.randint(1, size)
            first = random.randint(0, max_first)
        rows.append((slots[b], first, exact))
    return rows


def _ring(num_slots: int, size: int, h: int, d: int, dtype, rows):
    """Random exact K/V where rows read, large junk everywhere else."""
    ring_k = (torch.randn(num_slots, size, h, d) * 30).to(dtype)
    ring_v = torch.full((num_slots, size, h, d), 1e3).to(dtype)
    for slot, first, exact in rows:
        if slot < 0:
            continue
        idx = torch.arange(first, first + exact) % size
        ring_k[slot, idx] = (torch.randn(exact, h, d) * 2).to(dtype)
        ring_v[slot, idx] = torch.randn(exact, h, d).to(dtype)
    return ring_k, ring_v


def _setup(name, head_size, gqa, block_size, size, batch, dtype, max_first=70):
    h = random.randint(1, 2)
    rows = _windows(batch, size, max_first)
    ctx = [first for _, first, _ in rows]
    per_req = -(-max(max(ctx), 1) // block_size) + 1
    num_blocks = batch * per_req + 2
    fmt, kc, vc = codecs(name, head_size, h, dtype)
    cache = junk_cache(num_blocks, h, block_size, fmt.slot_bytes(head_size))
    table = random_block_tables(batch, per_req, num_blocks)
    fill_context(cache, table, ctx, kc, vc, head_size, dtype, key_scale=2.0)
    ring = _ring(batch + 2, size, h, head_size, dtype, rows)
    slots = torch.tensor([r[0] for r in rows])
    exact = torch.tensor([r[2] for r in rows])
    return h, kc, vc, cache, table, ctx, ring, slots, exact, rows


def _run_decode(name, *, size, gqa, head_size=None, seed=0, batch=4):
    head_size = head_size or random.choice([64, 128])
    block_size = random.choice([16, 32])
    splits = random.choice([1, 2, 3, 5])
    dtype = random.choice([torch.bfloat16, torch.float16])
    h, kc, vc, cache, table, ctx, ring, slots, exact, rows = _setup(
        name, head_size, gqa, block_size, size, batch, dtype)
    q = torch.randn(batch, h * gqa, head_size).to(dtype)
    k = (torch.randn(batch, h, head_size) * 2).to(dtype)
    v = torch.randn(batch, h, head_size).to(dtype)
    first = torch.tensor(ctx, dtype=random.choice([torch.int32, torch.int64]))
    scale = head_size ** -0.5
    kw = {"ring": ring, "window_slots": slots, "window_exact": exact}
    want = ref.decode_attention(q, k, v, cache, table, first, kc, vc, scale, **kw)
    got = api.decode_attention(q, k, v, cache, table, first, kc, vc, scale, num_splits=splits,
                               **kw)
    check_attention(got, want, dtype, f"decode {name} D={head_size} g={gqa} bs={block_size} "
                             f"splits={splits} H={h} R={size} rows={rows} {dtype} seed={seed}")


def _run_prefill(name, *, size, gqa, head_size=None, seed=0, batch=3):
    head_size = head_size or random.choice([64, 128])
    block_size = random.choice([16, 32])
    splits = random.choice([1, 2, 3])
    dtype = random.choice([torch.bfloat16, torch.float16])
    h, kc, vc, cache, table, ctx, ring, slots, exact, rows = _setup(
        name, head_size, gqa, block_size, size, batch, dtype)
    qlens, qsl = random_query_lens(batch)
    t = qsl[-1]
    q = torch.randn(t, h * gqa, head_size).to(dtype)
    k = (torch.randn(t, h, head_size) * 2).to(dtype)
    v = torch.randn(t, h, head_size).to(dtype)
    scale = head_size ** -0.5
    kw = {"ring": ring, "window_slots": slots, "window_exact": exact}
    want = ref.prefill_attention_varlen(q, k, v, cache, table, qsl, ctx, kc, vc, scale, **kw)
    got = api.prefill_attention_varlen(q, k, v, cache, table, qsl, ctx, kc, vc, scale,
                                       num_splits=splits, **kw)
    check_attention(got, want, dtype, f"prefill {name} D={head_size} g={gqa} bs={block_size} "
                             f"splits={splits} H={h} R={size} Tq={qlens} rows={rows} {dtype} "
                             f"seed={seed}")


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_decode_window(size, gqa, seed):
    _run_decode(random.choice(FORMAT_NAMES), size=size, gqa=gqa, seed=seed)


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("gqa", [1, 4])
def test_prefill_window(size, gqa, seed):
    _run_prefill(random.choice(FORMAT_NAMES), size=size, gqa=gqa, seed=seed)


def test_window_head_size_256(seed):
    _run_decode(random.choice(PRESET_NAMES), size=16, gqa=random.choice([1, 3]),
                head_size=256, seed=seed, batch=3)
    _run_prefill(random.choice(PRESET_NAMES), size=16, gqa=1, head_size=256, seed=seed,
                 batch=2)


def test_window_only_rows_and_single_request_entry(seed):
    """Every context token in the window (no packed context at all: the context launch is
    skipped) through ``prefill_attention``; the rows see the window and their chunk only."""
    dtype = torch.bfloat16
    size, h, gqa, d = 16, 2, 2, 64
    fmt, kc, vc = codecs("k4v2", d, h, dtype)
    cache = junk_cache(2, h, 16, fmt.slot_bytes(d))
    exact = random.randint(1, size)
    rows = [(1, 0, exact)]
    ring = _ring(3, size, h, d, dtype, rows)
    q = torch.randn(5, h * gqa, d).to(dtype)
    k = torch.randn(5, h, d).to(dtype)
    v = torch.randn(5, h, d).to(dtype)
    want = ref.prefill_attention(q, k, v, cache, torch.zeros(1, dtype=torch.int32), 0, kc, vc,
                                 0.125, ring=ring, window_slots=[1], window_exact=[exact])
    got = api.prefill_attention(q, k, v, cache, torch.zeros(1, dtype=torch.int32), 0, kc, vc,
                                0.125, ring=ring, window_slots=[1], window_exact=[exact])
    check_attention(got, want, dtype, f"exact={exact} seed={seed}")
