"""Prefill kernels (packed context + causal fresh chunk) vs ``paged_attention.prefill_attention``.

Same construction and tolerances as test_decode.py (see there for the justification): the
fresh chunk is attended with 16-bit tensor-core operands (softmax weights rounded to the
value dtype), the packed context with fp16-rounded dequantized operands.
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.kernels import api

from .helpers import (FORMAT_NAMES, PRESET_NAMES, check_attention, codecs, fill_context,
                      junk_cache, random_block_tables)


def _setup(name, head_size, gqa, block_size, ctx, dtype):
    h = random.randint(1, 2)
    batch = len(ctx)
    per_req = -(-max(max(ctx), 1) // block_size) + 1
    num_blocks = batch * per_req + 1
    fmt, kc, vc = codecs(name, head_size, h, dtype)
    cache = junk_cache(num_blocks, h, block_size, fmt.slot_bytes(head_size))
    table = random_block_tables(batch, per_req, num_blocks)
    fill_context(cache, table, ctx, kc, vc, head_size, dtype, key_scale=2.0)
    return h, kc, vc, cache, table


def _run_prefill(name, *, head_size=None, gqa=None, seed=0):
    head_size = head_size or random.choice([64, 64, 128, 256])
    gqa = gqa or random.choice([1, 3, 4, 8])
    block_size = random.choice([16, 32, 64])
    dtype = random.choice([torch.bfloat16, torch.float16])
    ctx = random.choice([0, random.randint(1, 80)])
    tq = random.randrange(1, 40, 2)
    h, kc, vc, cache, table = _setup(name, head_size, gqa, block_size, [ctx], dtype)
    q = torch.randn(tq, h * gqa, head_size).to(dtype)
    k = (torch.randn(tq, h, head_size) * 2).to(dtype)
    v = torch.randn(tq, h, head_size).to(dtype)
    scale = head_size ** -0.5
    want = ref.prefill_attention(q, k, v, cache, table[0], ctx, kc, vc, scale)
    got = api.prefill_attention(q, k, v, cache, table[0], ctx, kc, vc, scale,
                                num_splits=random.choice([1, 2]))
    check_attention(got, want, dtype, f"{name} D={head_size} g={gqa} bs={block_size} Tq={tq} ctx={ctx} "
                             f"H={h} {dtype} seed={seed}")


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_prefill_formats(name, seed):
    _run_prefill(name, seed=seed)


@pytest.mark.parametrize("gqa", [1, 3, 4, 8])
def test_prefill_gqa(gqa, seed):
    _run_prefill(random.choice(PRESET_NAMES), gqa=gqa, seed=seed)


@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_prefill_head_sizes(head_size, seed):
    _run_prefill(random.choice(PRESET_NAMES), head_size=head_size, seed=seed)


@pytest.mark.parametrize("name", ["k4v2", "qjl256v4", "bf16"])
def test_prefill_varlen_batch(name, seed):
    """Several requests in one launch pair: mixed chunk lengths (1 included) and contexts (0
    included), compared with the reference run request by request."""
    head_size = random.choice([64, 128])
    gqa = random.choice([1, 3, 4, 8])
    dtype = random.choice([torch.bfloat16, torch.float16])
    n = random.randint(2, 4)
    ctx = [random.choice([0, random.randint(1, 60)]) for _ in range(n)]
    qlens = [random.choice([1, random.randrange(1, 30, 2)]) for _ in range(n)]
    h, kc, vc, cache, table = _setup(name, head_size, gqa, 16, ctx, dtype)
    t = sum(qlens)
    q = torch.randn(t, h * gqa, head_size).to(dtype)
    k = (torch.randn(t, h, head_size) * 2).to(dtype)
    v = torch.randn(t, h, head_size).to(dtype)
    qsl = [0]
    for ql in qlens:
        qsl.append(qsl[-1] + ql)
    scale = head_size ** -0.5
    got = api.prefill_attention_varlen(q, k, v, cache, table, qsl,
                                       torch.tensor(ctx, dtype=torch.int32), kc, vc, scale)
    for r in range(n):
        s, e = qsl[r], qsl[r + 1]
        want = ref.prefill_attention(q[s:e], k[s:e], v[s:e], cache, table[r], ctx[r], kc, vc,
                                     scale)
        check_attention(got[s:e], want, dtype, f"{name} request {r} of qlens={qlens} ctx={ctx} "
                                      f"D={head_size} g={gqa} {dtype} seed={seed}")
