"""Sliding-window layers in the Triton kernels vs the torch reference.

A query at position p sees keys ``[p - W + 1, p]`` (``first_keys``): the context kernel starts
at the query tile's lowest first key and masks each row's own bound; the merge kernel applies
the same bound to the exact window and the chunk's fresh tokens. Blocks wholly behind every
query's window hold NaN bytes (``helpers.sliding_case``), so a read of a freed block shows up as
NaN, an off-by-one at the bound as an error far above the tolerance (keys at 2x scale make
attention peaked). Tolerances as in test_decode.py.
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.kernels import api

from .helpers import FORMAT_NAMES, check_attention, sliding_case


def _check(decode: bool, name: str, head_size: int, gqa: int, past_only: bool, seed):
    dtype = random.choice([torch.bfloat16, torch.float16])
    block_size = random.choice([16, 32])
    args, kw, what = sliding_case(name, decode=decode, head_size=head_size, gqa=gqa,
                                  block_size=block_size, dtype=dtype, past_only=past_only)
    splits = random.choice([1, 2, 3])
    if decode:
        want = ref.decode_attention(*args, **kw)
        got = api.decode_attention(*args, num_splits=splits, **kw)
    else:
        want = ref.prefill_attention_varlen(*args, **kw)
        got = api.prefill_attention_varlen(*args, num_splits=splits, **kw)
    check_attention(got, want, dtype, f"{what} splits={splits} seed={seed}")


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("gqa", [1, 4])
def test_sliding_decode(head_size, gqa, seed):
    _check(True, random.choice(FORMAT_NAMES), head_size, gqa, True, seed)


@pytest.mark.parametrize("head_size", [64, 256])
@pytest.mark.parametrize("past_only", [True, False])
def test_sliding_prefill(head_size, past_only, seed):
    _check(False, random.choice(FORMAT_NAMES), head_size, random.choice([1, 3]), past_only,
           seed)


def test_sliding_gemma_layer(seed):
    """Gemma 3 270M's shape: head size 256, one KV head, 4 query heads, the default preset."""
    _check(False, "k4v3", 256, 4, True, seed)
    _check(True, "k4v3", 256, 4, True, seed)
