"""The position rule of ``vllm_kvq.exactness``: what a query reads exactly depends on its
position alone, so a prompt gives the same attention cold, resumed after a prefix-cache hit,
or cut into chunks.

A whole prompt of T tokens is stored in a paged cache (as the backend stores a step's tokens
before attending). Its queries are then attended (a) as one cold chunk, (b) as the chunk
after a block-aligned prefix hit, (c) as the second of two chunks with the exact window
carried over in the ring, and (d) one token at a time as decodes. In the torch reference
(fp32 throughout) the rows every run shares agree to fp32 rounding, 1e-4 (measured: at most
2.7e-6 over 450 comparisons of 150 draws; reading keys through 2-bit codes instead of exactly
moves an output by more than 1e-3, which ``test_chunk_exact_semantics_depend_on_cache_state``
checks for the older ``prefill_exact`` semantics). The Triton kernels, given the same per-token limits, match the
reference within the usual attention tolerance (test_decode.py).
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.exactness import prefill_packed_limits, window_cap
from vllm_kvq.kernels import api

from .helpers import PRESET_NAMES, check_attention, codecs, junk_cache, random_block_tables

SAME = 1e-4  # fp32 summation-order differences only (measured <= 2.7e-6)


class Prompt:
    """One request's whole prompt stored in a shuffled paged cache."""

    def __init__(self, name, *, head_size, gqa, block_size, length, dtype, window):
        self.h = h = random.randint(1, 2)
        self.bs, self.window, self.dtype = block_size, window, dtype
        per_req = -(-length // block_size) + 1
        fmt, self.kc, self.vc = codecs(name, head_size, h, dtype)
        self.cache = junk_cache(per_req + 2, h, block_size, fmt.slot_bytes(head_size))
        self.table = random_block_tables(1, per_req, per_req + 2)
        self.q = torch.randn(length, h * gqa, head_size).to(dtype)
        self.k = (torch.randn(length, h, head_size) * 2).to(dtype)
        self.v = torch.randn(length, h, head_size).to(dtype)
        pos = torch.arange(length)
        slots = self.table[0, pos // block_size].long() * block_size + pos % block_size
        ref.store_slots(self.k, self.v, self.cache, slots, self.kc, self.vc)
        self.scale = head_size ** -0.5

    def _ring(self, first: int, exact: int) -> dict:
        """The exact tokens [first, first + exact) in a one-slot ring, as the backend keeps
        them (position p at ring index p % window), as the ops' window keywords."""
        ring_k = torch.zeros(1, self.window, *self.k.shape[1:], dtype=self.dtype)
        ring_v = torch.zeros_like(ring_k)
        pos = torch.arange(first, first + exact)
        ring_k[0, pos % self.window], ring_v[0, pos % self.window] = self.k[pos], self.v[pos]
        return {"ring": (ring_k, ring_v), "window_slots": [0], "window_exact": [exact]}

    def chunk(self, start: int, stop: int, ops=ref, exact_chunk: bool = False):
        """Tokens [start, stop) as one prefill chunk of a request that ran tokens [0, start)
        before (its window in the ring: at most window_cap exact tokens)."""
        exact = window_cap(start, self.window, self.bs) if self.window else 0
        packed = start - exact
        limits = None if exact_chunk else torch.tensor(
            prefill_packed_limits(start, stop - start, packed, self.window, self.bs))
        window = self._ring(packed, exact) if self.window else {}
        sl = slice(start, stop)
        return ops.prefill_attention(self.q[sl], self.k[sl], self.v[sl], self.cache,
                                     self.table[0], packed, self.kc, self.vc, self.scale,
                                     packed_limits=limits, **window)

    def decode(self, p: int):
        """Token p as a decode: every earlier key packed but the window's (capped) tail."""
        exact = window_cap(p, self.window, self.bs) if self.window else 0
        window = self._ring(p - exact, exact) if self.window else {}
        sl = slice(p, p + 1)
        return ref.decode_attention(self.q[sl], self.k[sl], self.v[sl], self.cache,
                                    self.table[:, :], torch.tensor([p - exact]), self.kc,
                                    self.vc, self.scale, **window)


def _prompt(name=None, window=None, block_size=None, length=None):
    block_size = block_size or random.choice([16, 32])
    window = random.choice([0, 0, 8, 16, 24, 48]) if window is None else window
    length = length or random.randint(2 * block_size + 1, 5 * block_size)
    return Prompt(name or random.choice(PRESET_NAMES), head_size=random.choice([64, 128]),
                  gqa=random.choice([1, 3, 4]), block_size=block_size, length=length,
                  dtype=random.choice([torch.bfloat16, torch.float16]), window=window)


def _same(a, b, what):
    err = (a - b).abs().max().item()
    assert err <= SAME, f"{what}: max diff {err:.2e}"


def test_limits_follow_the_rule():
    bs = random.choice([16, 32, 128])
    for window in (0, 1, bs // 2, bs, 3 * bs):
        ctx = random.randint(0, 4 * bs)
        n = random.randint(1, 3 * bs)
        exact = window_cap(ctx, window, bs)
        limits = list(prefill_packed_limits(ctx, n, ctx - exact, window, bs))
        for p, lim in zip(range(ctx, ctx + n), limits):
            block_start = p - p % bs
            assert lim == max(p - window, block_start, ctx - exact), (window, ctx, p, lim)
            assert block_start <= lim <= p  # never exact across a block boundary
        assert limits == sorted(limits)  # the kernels read a tile's limit off its last row


@pytest.mark.parametrize("window", [0, 16, 24])
def test_cold_equals_prefix_hit(window, seed):
    """Rows after a block-aligned prefix hit read exactly what the cold prompt's rows read."""
    pr = _prompt(window=window)
    t = pr.q.shape[0]
    cold = pr.chunk(0, t)
    hit = random.randrange(pr.bs, t, pr.bs)
    _same(pr.chunk(hit, t), cold[hit:], f"hit at {hit} of {t} bs={pr.bs} R={window} seed={seed}")


@pytest.mark.parametrize("window", [0, 16, 24])
def test_cold_equals_chunked_and_decoded(window, seed):
    """Cutting the prompt into two chunks at any token, or decoding its last tokens one by
    one, changes nothing either."""
    pr = _prompt(window=window)
    t = pr.q.shape[0]
    cold = pr.chunk(0, t)
    cut = random.randint(1, t - 1)
    _same(pr.chunk(cut, t), cold[cut:], f"cut at {cut} of {t} bs={pr.bs} R={window} seed={seed}")
    for p in sorted(random.sample(range(1, t), 4)):
        _same(pr.decode(p), cold[p:p + 1], f"decode at {p} bs={pr.bs} R={window} seed={seed}")


def test_chunk_exact_semantics_depend_on_cache_state(seed):
    """The opt-in ``prefill_exact`` semantics: the cold chunk reads itself exactly, a request
    resuming after a hit reads the cached part packed, and 2-bit codes make that visible
    (smallest difference over 300 draws: 0.80; the bound is 1e-3)."""
    pr = _prompt("k2v2", window=0)
    t = pr.q.shape[0]
    cold = pr.chunk(0, t, exact_chunk=True)
    hit = random.randrange(pr.bs, t, pr.bs)
    err = (pr.chunk(hit, t, exact_chunk=True) - cold[hit:]).abs().max().item()
    assert err > 1e-3, err


@pytest.mark.parametrize("window", [0, 24])
def test_kernels_follow_the_limits(window, seed):
    """The Triton prefill (packed context and merge kernels) with per-token limits, vs the
    reference, for a chunk that starts mid-prompt (ring in use) or at 0."""
    pr = _prompt(window=window, length=random.randint(33, 90))
    t = pr.q.shape[0]
    start = random.choice([0, random.randint(1, t - 2)])
    want = pr.chunk(start, t)
    got = pr.chunk(start, t, ops=api)
    check_attention(got, want, pr.dtype, f"start={start} T={t} bs={pr.bs} R={window} "
                                         f"seed={seed}")
