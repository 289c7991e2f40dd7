"""The exact recent window: slot bookkeeping, and the backend reading the last R context tokens
exactly (the rest packed) across prefill chunks, decodes, prefix-cache-style starts and
requests that come and go."""

import pytest
import torch

from tests.test_backend_conformance import Harness, Request, assert_tight
from vllm_kvq.window import RecentWindows, publish_batch

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_seed")


# -- bookkeeping -----------------------------------------------------------------------------
def test_continuations_accumulate_up_to_the_window():
    w = RecentWindows(num_slots=2, size=8)
    assert w.plan(1, ["a"], [0], [5]).exact == [0]  # first chunk: nothing held yet
    assert w.plan(2, ["a"], [5], [1]).exact == [5]  # decode: the 5 prefill tokens
    assert w.plan(3, ["a"], [6], [20]).exact == [6]
    assert w.plan(4, ["a"], [26], [1]).exact == [8]  # a 20-token chunk fills the window


def test_a_gap_restarts_the_window():
    w = RecentWindows(num_slots=1, size=8)
    w.plan(1, ["a"], [0], [6])
    # Prefix-cache hit / resume after preemption: the step does not start where the slot ends.
    assert w.plan(2, ["a"], [32], [4]).exact == [0]
    assert w.plan(3, ["a"], [36], [1]).exact == [4]


def test_released_requests_free_their_slot_and_skipped_ones_keep_it():
    w = RecentWindows(num_slots=2, size=8)
    assert w.plan(1, ["a", "b", "c"], [0, 0, 0], [3, 3, 3]).slots == [0, 1, -1]
    assert w.plan(2, ["b"], [3], [1]).exact == [3]  # "a" skipped a step: keeps its slot
    assert w.plan(3, ["a", "b"], [3, 4], [1, 1]).exact == [3, 4]
    w.release(["a"])  # finished (or preempted)
    plan = w.plan(4, ["c", "b"], [3, 5], [1, 1])  # "c" takes a's slot, starting empty
    assert plan.slots == [0, 1] and plan.exact == [0, 5]


def test_a_missed_release_reclaims_the_longest_idle_slot():
    w = RecentWindows(num_slots=2, size=8)
    w.plan(1, ["a", "b"], [0, 0], [2, 2])
    w.plan(2, ["b"], [2], [1])
    assert w.plan(3, ["c"], [0], [4]).slots == [0]  # "a" idle since step 1


def test_every_builder_of_a_step_gets_the_same_plan():
    w = RecentWindows(num_slots=2, size=8)
    first = w.plan(7, ["a"], [0], [4])
    assert w.plan(7, ["a"], [0], [4]) is first
    assert w.plan(8, ["a"], [4], [1]).exact == [4]


# -- backend ---------------------------------------------------------------------------------
WINDOW = 24


def _view(full: Request, context: int, query: int, hq: int, d: int, dtype) -> Request:
    """One step of a longer request: its first context + query tokens, fresh queries."""
    r = Request(context, query, blocks=full.blocks)
    r.k, r.v = full.k[:context + query], full.v[:context + query]
    r.q = (torch.randn(query, hq, d) * 1.5).to(dtype)
    return r


@pytest.mark.parametrize("preset,block_size", [("k2v2", 16), ("k4v2", 32)])
def test_backend_reads_the_window_exactly(tmp_path_factory, preset, block_size):
    """Three steps over requests a (prefill, chunk, decode), b (prefill, decodes) and c
    (starts after a prefix-cache hit: its cached context must be read packed). Every output
    must match attention over [dequantized | exact window | fresh] K/V, with the window's
    extent predicted independently here."""
    h = Harness(tmp_path_factory, head_size=64, num_heads=6, num_kv_heads=2,
                block_size=block_size, kvq={"preset": preset, "window": WINDOW}, num_layers=1)
    full = dict(zip("abc", h.make_requests([(0, 75), (0, 14), (0, 43)])))
    cache = h.junk_cache(0)
    # c's first 33 tokens were cached by another request: stored, never seen by the window.
    h.store_context(0, cache, [_view(full["c"], 33, 0, h.hq, h.d, h.dtype)])
    steps = [  # (request, context, new tokens, exact tokens expected)
        [("a", 0, 40, 0), ("b", 0, 13, 0)],
        [("b", 13, 1, 13), ("a", 40, 34, WINDOW), ("c", 33, 9, 0)],
        [("a", 74, 1, WINDOW), ("b", 14, 0, None), ("c", 42, 1, 9)],
    ]
    for step in steps:
        rows = [(name, _view(full[name], c, q, h.hq, h.d, h.dtype), e)
                for name, c, q, e in step if q]
        rows.sort(key=lambda row: row[1].query > 1)  # vLLM orders decodes first
        reqs = [r for _, r, _ in rows]
        h.set_block_table(reqs)
        publish_batch([name for name, _, _ in rows])
        out = h.step(0, cache, reqs)
        start = 0
        for _, r, exact in rows:
            k_hat, v_hat = h.dequantized_context(0, cache, r)
            first = r.context - exact
            k = torch.cat([k_hat[:first].double(), r.k[first:].double()])
            v = torch.cat([v_hat[:first].double(), r.v[first:].double()])
            ref, _ = h.attention(r, k, v)
            assert_tight(out[start:start + r.query], ref, h.dtype,
                         f"request with context {r.context}, window {exact}")
            start += r.query
