"""Tensor parallelism (mp executor over gloo on CPU): KVQ gives the same answers at TP=1, 2
and 3, at least as closely as vLLM's bf16 backend agrees with itself across TP sizes.

A tiny generated Llama with 6 KV heads splits evenly at TP=2 and TP=3; its policy mixes page
sizes per layer (QJL and rotated 4/2-bit), so every rank must agree on per-layer specs and
on every per-head random map (keyed by the global KV-head index).
"""

import sys
from pathlib import Path

import pytest

from vllm_kvq.assets import tiny_llama_path

from .conftest import greedy, shutdown

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import agreement  # noqa: E402  (benchmarks/common.py: the same metric)

POLICY = {"preset": "k4v2", "layers": {"0": "qjl256v4"}}
TP_SIZES = (2, 3)


def _prompts():
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[(31 * i + 7 * r) % 9000 + 50 for i in range(n)])
            for r, n in ((1, 300), (2, 190), (3, 77))]


@pytest.fixture(scope="module")
def outputs():
    """Greedy outputs of KVQ and of CPU_ATTN (bf16) at TP = 1, 2, 3, one engine at a time."""
    from vllm import LLM

    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # fewer NUMA nodes than ranks
        for backend in ("KVQ", "CPU_ATTN"):
            for tp in (1, *TP_SIZES):
                extra = {"additional_config": {"kvq": POLICY}} if backend == "KVQ" else {}
                llm = LLM(model=tiny_llama_path(num_kv_heads=6, num_heads=12),
                          attention_backend=backend, tensor_parallel_size=tp,
                          distributed_executor_backend="mp", enforce_eager=True, seed=0,
                          max_model_len=1024, max_num_batched_tokens=128,
                          kv_cache_memory_bytes=32 << 20, **extra)
                try:
                    results[backend, tp] = greedy(llm, _prompts(), max_tokens=24)
                finally:
                    shutdown(llm)
    return results


@pytest.mark.parametrize("tp", TP_SIZES)
def test_kvq_agrees_across_tp_like_bf16(outputs, tp):
    kvq_match, kvq_diff = agreement(outputs["KVQ", 1], outputs["KVQ", tp])
    ref_match, ref_diff = agreement(outputs["CPU_ATTN", 1], outputs["CPU_ATTN", tp])
    print(f"TP={tp}: KVQ token match {kvq_match:.2%} (max logprob diff {kvq_diff:.3f}); "
          f"bf16 {ref_match:.2%} ({ref_diff:.3f})")
    assert kvq_match >= ref_match
    # All-reduce order changes bf16 rounding; the logits of this model are spread over
    # several nats, so the same tokens come out with logprobs within a few hundredths.
    assert kvq_diff <= max(0.1, 2 * ref_diff)
