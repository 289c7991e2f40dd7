"""The Triton kernels run end to end inside vLLM (forced on CPU through Triton's
interpreter) and match the torch path on a tiny generated model.

Small blocks (32 tokens) and a 32-token step budget make every path run: fresh prefill,
chunked prefill reading packed context, prefix-cache continuations (at the window's exact
span, 256 tokens: vllm_kvq/exactness.py) and decode; one layer
stores KIVI 2-bit keys (packed a group at a time) and one QJL keys, both with a 32-token
exact window read from the ring, so every key kind and the window go through the kernels.
"""

import pytest

from vllm_kvq.assets import tiny_llama_path

from .conftest import greedy, shutdown

POLICY = {"preset": "kivi2", "window": 32, "layers": {"1": "qjl256v4"}}


def _run(monkeypatch, kernels: str):
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    monkeypatch.setenv("VLLM_KVQ_KERNELS", kernels)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    llm = LLM(model=tiny_llama_path(), attention_backend="KVQ", enforce_eager=True, seed=0,
              max_model_len=512, block_size=32, max_num_batched_tokens=32,
              enable_prefix_caching=True, kv_cache_memory_bytes=16 << 20,
              additional_config={"kvq": POLICY})
    try:
        prompts = [TokensPrompt(prompt_token_ids=[(37 * i + 11 * r) % 5000 + 100
                                                  for i in range(n)])
                   for r, n in ((1, 290), (2, 45))]
        first = greedy(llm, prompts, max_tokens=8)
        again = greedy(llm, prompts[:1], max_tokens=8)  # prefix-cache hit of one span
        assert again[0].num_cached_tokens == 256
        return first + again
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def torch_outputs():
    with pytest.MonkeyPatch.context() as mp:
        return _run(mp, "torch")


def test_forced_triton_matches_torch_path(monkeypatch, torch_outputs):
    triton_outputs = _run(monkeypatch, "triton")
    for ref, got in zip(torch_outputs, triton_outputs):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(ref.outputs[0].logprobs, got.outputs[0].logprobs):
            tok = next(iter(a))
            # fp32 accumulation in a different order; logits are bf16 (steps of 1/64-1/8).
            assert abs(a[tok].logprob - b[tok].logprob) < 0.05
