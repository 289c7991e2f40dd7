"""Sliding-window layers (Gemma 3, Mistral-style): a query at position p reads only the keys
[p - W + 1, p], packed or exact by the same position rule as full layers, and never the
blocks vLLM freed behind the window.

Each step runs through the real builder (a ``SlidingWindowSpec`` group) and impl; blocks
that lie wholly before every query's window are swapped in the block table for a junk block
of 0xFF bytes (NaN fields), as vLLM's sliding-window manager hands such entries to other
requests, so reading one poisons the output. Through the compiled CPU kernels and the torch path (the
Triton kernels' bounds are tested in tests/kernels/test_sliding.py).
"""

import pytest

from tests.test_backend_conformance import Harness, assert_tight
from tests.test_window import _view
from vllm_kvq import paged_attention
from vllm_kvq.cpu_kernel import ops as cpu_ops
from vllm_kvq.window import publish_batch

pytestmark = pytest.mark.usefixtures("one_thread", "seed")

W = 40


def _freed(h: Harness, r, junk_block: int):
    """The request with every block before its first query's window replaced by junk."""
    first_key = max(0, r.context - W + 1)
    r.blocks = [junk_block if (b + 1) * h.bs <= first_key else block
                for b, block in enumerate(r.blocks)]
    return r


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
@pytest.mark.parametrize("preset, window, head_size", [
    ("k4v2", 0, 64), ("k4v3", 16, 256), ("bf16", 0, 128), ("k8v8", 8, 256)])
def test_sliding_window_layer_reads_only_its_window(tmp_path_factory, monkeypatch, kernels,
                                                    preset, window, head_size):
    monkeypatch.setenv("VLLM_KVQ_KERNELS", kernels)
    h = Harness(tmp_path_factory, head_size=head_size, num_heads=4, num_kv_heads=1,
                block_size=16, kvq={"preset": preset, "window": window}, num_layers=1,
                sliding_window=W)
    full = dict(zip("ab", h.make_requests([(0, 150), (0, 120)])))
    junk_block = h.num_blocks
    h.num_blocks += 1
    cache = h.junk_cache(0)
    cache[junk_block] = 255
    steps = [[("a", 0, 37), ("b", 0, 61)],  # b's prompt is longer than the window
             [("a", 37, 70), ("b", 61, 1)],  # a's chunk crosses the window twice over
             [("a", 107, 1), ("b", 62, 27)]]
    steps += [[("a", c, 1), ("b", c - 19, 1)] for c in range(108, 126)]
    for step in steps:
        rows = [(name, _freed(h, _view(full[name], c, q, h.hq, h.d, h.dtype), junk_block))
                for name, c, q in step]
        rows.sort(key=lambda row: row[1].query > 1)  # vLLM orders decodes first
        reqs = [r for _, r in rows]
        h.set_block_table(reqs)
        publish_batch([name for name, _ in rows])
        out = h.step(0, cache, reqs)
        start = 0
        for name, r in rows:
            exact = min(window, r.context)  # held by the request since its first step
            ref = h.reference(0, cache, r, exact)
            assert_tight(out[start:start + r.query], ref, h.dtype,
                         f"{name} at {r.context} (+{r.query}), window {exact}")
            start += r.query
    publish_batch(None)
    ops = h.impls[0].paths[0].ops
    assert ops is (cpu_ops if kernels == "cpu" else paged_attention), ops
