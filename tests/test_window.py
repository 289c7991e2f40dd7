"""The exact recent window: slot bookkeeping, and the backend reading the last R context tokens
exactly (the rest packed) across prefill chunks, decodes, prefix-cache-style starts and
requests that come and go."""

import pytest
import torch

from tests.test_backend_conformance import Harness, Request, assert_tight
from vllm_kvq.window import RecentWindows, publish_batch

pytestmark = pytest.mark.usefixtures("one_thread", "seed")


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


def test_rejected_draft_tokens_roll_back_without_shortening_the_window():
    """Speculative decoding, 3 drafts per step: the ring holds 8 + 3 positions, so resuming at
    the first rejected position still finds the full 8-token window."""
    w = RecentWindows(num_slots=1, size=8, capacity=8 + 3)
    w.plan(1, ["a"], [0], [20])  # the prompt
    assert w.plan(2, ["a"], [20], [4]).exact == [8]  # verify 3 drafts (positions 20-23)
    assert w.plan(3, ["a"], [22], [4]).exact == [8]  # 1 accepted: 22 and 23 rolled back
    assert w.plan(4, ["a"], [23], [1]).exact == [8]  # none accepted
    assert w.plan(5, ["a"], [24], [4]).exact == [8]
    short = RecentWindows(num_slots=1, size=8)  # a ring of only R positions would lose some
    for step, (ctx, new) in enumerate([(0, 20), (20, 4)]):
        short.plan(step, ["a"], [ctx], [new])
    assert short.plan(3, ["a"], [22], [4]).exact == [6]


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
def test_backend_reads_the_window_exactly(tmp_path_factory, preset, block_size, canary=True):
    """Three steps over requests a (prefill, chunk, decode), b (prefill, decodes) and c
    (starts after a prefix-cache hit: its cached context must be read packed). Every output
    must match attention over [dequantized | exact window | fresh] K/V, with the window's
    extent predicted independently here (the tokens the request holds; the harness applies
    the block-boundary rule)."""
    h = Harness(tmp_path_factory, head_size=64, num_heads=6, num_kv_heads=2,
                block_size=block_size, kvq={"preset": preset, "window": WINDOW,
                                            "canary": canary}, num_layers=1)
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
            # Rows read packed before their limit (the window capped at the block start,
            # vllm_kvq/exactness.py), dequantized here from the cache bytes.
            ref = h.reference(0, cache, r, exact)
            assert_tight(out[start:start + r.query], ref, h.dtype,
                         f"request with context {r.context}, window {exact}")
            start += r.query


@pytest.mark.parametrize("preset,block_size", [("k4v2", 32), ("kivi2", 32)])
def test_rejected_drafts_leave_nothing_a_later_step_reads(tmp_path_factory, preset,
                                                          block_size):
    """Speculative decoding (n-gram, 3 drafts): a verification step writes K/V for draft
    tokens that may be rejected; the next step rewrites those positions with other K/V. Each
    step fed junk K/V at the positions that end up rejected, so a stale ring entry or packed
    slot read later (or a window shortened by the roll-back) misses the reference, which
    reads only the K/V finally at each position, with the position-only exact window."""
    window = 32 if preset == "kivi2" else WINDOW
    h = Harness(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2,
                block_size=block_size, kvq={"preset": preset, "window": window},
                num_layers=1, speculative_tokens=3)
    (full,) = h.make_requests([(0, 90)])
    cache = h.junk_cache(0)
    # (context, tokens fed, tokens accepted: the rest are rejected drafts)
    steps = [(0, 40, 40), (40, 4, 2), (42, 4, 1), (43, 1, 1), (44, 4, 4), (48, 4, 3),
             (51, 4, 2), (53, 1, 1), (54, 4, 4), (58, 4, 1), (59, 1, 1), (60, 4, 4)]
    for ctx, fed, accepted in steps:
        r = _view(full, ctx, fed, h.hq, h.d, h.dtype)
        junk = torch.randn(fed - accepted, h.h, h.d).to(h.dtype) * 3
        r.k = torch.cat([r.k[:ctx + accepted], junk])
        r.v = torch.cat([r.v[:ctx + accepted], -junk])
        h.set_block_table([r])
        publish_batch(["a"])
        out = h.step(0, cache, [r])
        exact = min(window, ctx)  # held by the request since its first step
        k_hat, v_hat = _decode_blocks(h, cache, r, int(h.packed_limits(r, exact).max()))
        ref = h.reference(0, cache, r, exact, decoded=(k_hat, v_hat))
        assert_tight(out, ref, h.dtype, f"step at {ctx} ({fed} fed, {accepted} accepted)")
    publish_batch(None)


def _decode_blocks(h: Harness, cache, r: Request, tokens: int):
    """Model-space K/V ``[tokens, H, D]`` decoded from the request's whole blocks (KIVI key
    groups are decoded as groups, so whole blocks rather than single slots)."""
    kc, vc = h.codecs(0)
    pages = cache[torch.tensor(r.blocks)].permute(1, 0, 2, 3).flatten(1, 2)  # [H, N, C]
    k_hat = kc.finish_output(kc.decode(pages[..., :kc.nbytes]))
    v_hat = vc.finish_output(vc.decode(pages[..., kc.nbytes:kc.nbytes + vc.nbytes]))
    return k_hat.transpose(0, 1)[:tokens], v_hat.transpose(0, 1)[:tokens]


@pytest.mark.parametrize("block_size", [32, 64])
def test_kivi_groups_are_packed_when_they_complete(tmp_path_factory, block_size):
    """KIVI keys: 32-token groups packed when complete, from the step's keys and the window.
    Request a prefills 45 tokens (one group packed, 13 open), then decodes across the next
    group boundary; b starts after a prefix-cache hit on one full block. Every step must match
    attention over [decoded packed groups | exact window | fresh]."""
    h = Harness(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2,
                block_size=block_size, kvq={"preset": "kivi2", "window": 32}, num_layers=1)
    full = dict(zip("ab", h.make_requests([(0, 72), (0, block_size + 40)])))
    cache = h.junk_cache(0)
    # b's first block came from another request's (completed, packed) groups.
    donor = _view(full["b"], 0, block_size, h.hq, h.d, h.dtype)
    h.set_block_table([donor])
    publish_batch(["donor"])
    h.step(0, cache, [donor])
    steps = [[("a", 0, 45), ("b", block_size, 7)]]
    steps += [[("a", c, 1), ("b", block_size + 7 + c - 45, 1)] for c in range(45, 68)]
    for step in steps:
        rows = [(name, _view(full[name], c, q, h.hq, h.d, h.dtype)) for name, c, q in step]
        rows.sort(key=lambda row: row[1].query > 1)
        reqs = [r for _, r in rows]
        h.set_block_table(reqs)
        publish_batch([name for name, _ in rows])
        out = h.step(0, cache, reqs)
        start = 0
        for name, r in rows:
            # The window holds what this request computed itself, up to 32 tokens.
            began = 0 if name == "a" else block_size
            exact = min(32, r.context - began)
            packed = int(h.packed_limits(r, exact).max())  # the chunk's packed groups too
            k_hat, v_hat = _decode_blocks(h, cache, r, packed)
            if packed:  # packed groups hold the keys (2-bit per channel: RMS error ~0.39 sigma)
                err = (k_hat - r.k[:packed].float()).norm() / r.k[:packed].float().norm()
                assert err < 0.45, f"{name}: packed KIVI keys off by {err:.2f} (relative)"
            ref = h.reference(0, cache, r, exact, decoded=(k_hat, v_hat))
            assert_tight(out[start:start + r.query], ref, h.dtype,
                         f"{name} at {r.context}: window {exact}")
            start += r.query
    publish_batch(None)


def test_kivi_needs_a_window_of_one_group():
    from vllm_kvq.config import KVQConfig, KVQConfigError

    with pytest.raises(KVQConfigError, match="need window >= 32 \\(got 16\\)"):
        KVQConfig.from_dict({"preset": "kivi2", "window": 16}).validate_model(64, 2)
    with pytest.raises(KVQConfigError, match="need window >= 64"):
        KVQConfig.from_dict({"preset": "kivi2", "window": 32, "group_size": 64}
                            ).validate_model(64, 2)
    cfg = KVQConfig.from_dict({"preset": "kivi2", "window": 32, "key_bits": 4})
    cfg.validate_model(64, 2)
    # 4-bit codes (32 B) + an eighth of the 32-token group's 4 x 64 B statistics (8 B), then
    # 2-bit values (16 B + 8 B of fp16 scale/min): 64 B slots.
    assert cfg.default.key.kind == "kivi" and cfg.default.slot_bytes(64) == 64


@pytest.mark.parametrize("preset,block_size", [("k2v2", 16), ("k4v2", 32)])
def test_backend_reads_the_window_exactly_triton(tmp_path_factory, monkeypatch, preset,
                                                 block_size):
    """The same steps through the Triton kernels (Triton's interpreter on CPU), which read
    the window straight from the ring (the merge kernel) instead of a gathered copy. The
    kernels multiply 16-bit operands (softmax weights rounded to the value dtype, as any
    tensor-core attention does), so the bound is the kernel tests' (tests/kernels/
    test_decode.py: 1e-2 absolute for bf16) on top of the output's own rounding; a token
    missed or read twice moves outputs by far more."""
    import sys

    from tests.kernels.helpers import TOL
    from tests.test_backend_conformance import TIGHT
    from vllm_kvq.kernels import api

    def assert_kernel_close(out, ref, dtype, what):
        rtol, _ = TIGHT[dtype]
        out = out.double()
        assert torch.isfinite(out).all(), what
        excess = (out - ref).abs() - (rtol * ref.abs() + TOL[dtype])
        assert excess.max() <= 0, f"{what}: max |out - ref| over budget by {excess.max():.3g}"

    monkeypatch.setenv("VLLM_KVQ_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys.modules[__name__], "assert_tight", assert_kernel_close)
    windows = []  # the kernels must get the ring (not a gathered copy), for both launches

    def spy(launch):
        def wrapped(*args, window=None, **kwargs):
            windows.append((launch.__name__, window is not None
                            and window.ring_k.is_contiguous()
                            and window.ring_k.shape[1] == WINDOW))
            return launch(*args, window=window, **kwargs)
        return wrapped

    for name in ("plan_decode", "plan_prefill"):
        monkeypatch.setattr(api, name, spy(getattr(api, name)))
    # The canary's own decode (vllm_kvq/canary.py) reads no window: off, so every launch
    # recorded here is the step's.
    test_backend_reads_the_window_exactly(tmp_path_factory, preset, block_size, canary=False)
    assert {"plan_decode", "plan_prefill"} == {n for n, _ in windows}
    assert all(ring for _, ring in windows), windows
