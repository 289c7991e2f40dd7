"""Split-K paged decode kernel vs ``paged_attention.decode_attention`` (the torch reference).

The context is written by the *reference* store into shuffled blocks of a cache that starts
as random bytes, so slots past a request's context (and blocks it does not own) hold junk,
including NaN/inf fp16 fields: any masking mistake shows up as garbage, not as a small error.

Tolerance (absolute; outputs are averages of N(0, 1) values, so max|v| is about 4.5): the
reference computes in fp32 on exactly dequantized values; the kernels feed tensor-core dots
with 16-bit operands, as a GPU kernel must (and as FlashAttention does). Raw bf16 values (and a
prefill's fresh chunk, always exact) are multiplied by softmax weights rounded to bf16
(relative 2^-9), which alone allows 2^-9 * max|v| ~ 9e-3; coded values and weights go through
fp16 (2^-11 each; where the kernels fold the group scales out of the dots -- decode up to head
size 128, kernels.launch.folds_keys / folds_values -- the codes reach the dots exactly and the
weights times the value scales are rounded to fp16 instead); queries and dequantized keys are
rounded to 16 bits before the score dot (folded: the query alone),
which moves the weights a little more where attention is peaked (QJL's estimator sums many
large terms, so its scores move most). Measured over 1,500 random decode and 1,500 prefill
draws of every format (and 740 of the window and KIVI variants), 2026-11-29: largest error
9.1e-3 with bf16 (p99 7.8e-3), 4.4e-3 with fp16 (p99 2.5e-3)
(`python -m tests.kernels.tolerance_survey` repeats the measurement). The tolerance is about twice the
largest seen, so a pass does not hang on the last bit of a tail: 2e-2 for bf16, 1e-2 for fp16
models. What it is there to catch is far larger: an extra context token reads junk bytes
(garbage or NaN), a dropped one moves the output by p_i |v_i - out| (keys are drawn at 2x scale
so attention is peaked and the leading tokens carry most of the weight), a wrong scale, group
or rotation moves every output.
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.kernels import api

from .helpers import (FORMAT_NAMES, PRESET_NAMES, check_attention, codecs, fill_context,
                      junk_cache, random_block_tables)


def _run_decode(name, *, head_size=None, gqa=None, block_size=None, splits=None, seed=0,
                max_context=100, batch=3):
    head_size = head_size or random.choice([64, 64, 128, 256])
    gqa = gqa or random.choice([1, 3, 4, 8])
    block_size = block_size or random.choice([16, 32, 64])
    splits = splits or random.choice([1, 2, 3, 5])
    dtype = random.choice([torch.bfloat16, torch.float16])
    h = random.randint(1, 2)
    ctx = [random.randint(0, max_context) for _ in range(batch)]
    ctx[random.randrange(batch)] |= 1  # at least one odd length
    per_req = -(-max(ctx) // block_size) + 1
    num_blocks = batch * per_req + 2
    fmt, kc, vc = codecs(name, head_size, h, dtype)
    cache = junk_cache(num_blocks, h, block_size, fmt.slot_bytes(head_size))
    table = random_block_tables(batch, per_req, num_blocks)
    fill_context(cache, table, ctx, kc, vc, head_size, dtype, key_scale=2.0)
    q = torch.randn(batch, h * gqa, head_size).to(dtype)
    k = torch.randn(batch, h, head_size).to(dtype)
    v = torch.randn(batch, h, head_size).to(dtype)
    lens = torch.tensor(ctx, dtype=random.choice([torch.int32, torch.int64]))
    scale = head_size ** -0.5
    want = ref.decode_attention(q, k, v, cache, table, lens, kc, vc, scale)
    got = api.decode_attention(q, k, v, cache, table, lens, kc, vc, scale, num_splits=splits)
    check_attention(got, want, dtype, f"{name} D={head_size} g={gqa} bs={block_size} "
                    f"splits={splits} H={h} ctx={ctx} {dtype} seed={seed}")
    return got


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_decode_formats(name, seed):
    _run_decode(name, seed=seed)


@pytest.mark.parametrize("gqa", [1, 3, 4, 8])
def test_decode_gqa(gqa, seed):
    _run_decode(random.choice(PRESET_NAMES), gqa=gqa, seed=seed)


@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_decode_head_sizes(head_size, seed):
    _run_decode(random.choice(PRESET_NAMES), head_size=head_size, seed=seed)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_decode_block_sizes(block_size, seed):
    _run_decode(random.choice(PRESET_NAMES), block_size=block_size, head_size=64, seed=seed,
                max_context=150)


@pytest.mark.parametrize("splits", [1, 4, 16])
def test_decode_splits(splits, seed):
    """More splits than blocks leaves some splits empty; the merge must ignore them."""
    _run_decode(random.choice(PRESET_NAMES), splits=splits, block_size=16, seed=seed,
                max_context=70)


def test_decode_zero_context_is_fresh_only(seed):
    """With no context every row attends only to its own token: output == its value."""
    fmt, kc, vc = codecs("k4v2", 64, 2)
    cache = junk_cache(2, 2, 16, fmt.slot_bytes(64))
    q = torch.randn(2, 6, 64).to(torch.bfloat16)
    k = torch.randn(2, 2, 64).to(torch.bfloat16)
    v = torch.randn(2, 2, 64).to(torch.bfloat16)
    out = api.decode_attention(q, k, v, cache, torch.zeros(2, 1, dtype=torch.int32),
                               torch.zeros(2, dtype=torch.int32), kc, vc, 0.125, num_splits=2)
    expect = v.float().repeat_interleave(3, dim=1)
    assert torch.allclose(out, expect, atol=1e-6)


def test_decode_long_context(seed):
    """Several tiles per split and tiles spanning many shuffled blocks."""
    _run_decode(random.choice(PRESET_NAMES), head_size=64, block_size=16, splits=3,
                max_context=700, batch=2, seed=seed)
