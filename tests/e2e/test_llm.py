"""KVQ inside a real vLLM engine: output quality, capacity, chunked prefill and prefix caching.

One KVQ engine (default preset) serves every test here. Chunked prefill is forced with a
256-token step budget (two 128-token blocks), so long prompts read earlier chunks back from
the packed cache, and prefix caching is on.
"""

import pytest

from vllm_kvq.config import DEFAULT_PRESET, KVQConfig

from .conftest import (BLOCK, MAX_TOKENS, PROMPTS, assert_close_to, capacity_tokens, greedy,
                       make_llm, shutdown, teacher_forced_top1)

CHUNK = 2 * BLOCK


@pytest.fixture(scope="module")
def kvq_llm():
    llm = make_llm("KVQ", {"preset": DEFAULT_PRESET}, enable_prefix_caching=True,
                   max_num_batched_tokens=CHUNK)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def kvq_outputs(kvq_llm):
    return greedy(kvq_llm, PROMPTS)


def test_default_preset_capacity_is_at_least_4x_bf16(kvq_llm, bf16_reference):
    head_size = kvq_llm.llm_engine.vllm_config.model_config.get_head_size()
    expected = KVQConfig.from_dict({}).default.compression(head_size)
    ratio = capacity_tokens(kvq_llm) / bf16_reference["capacity"]
    # vLLM floors the block count, so the measured ratio may only exceed the slot ratio.
    assert ratio >= expected - 1e-9, (ratio, expected)
    assert ratio >= 4.0


def test_output_is_coherent(kvq_outputs):
    assert "Paris" in kvq_outputs[0].outputs[0].text
    for out in kvq_outputs:
        text = out.outputs[0].text
        assert len(out.outputs[0].token_ids) > 0
        # Degenerate decoding (one token repeated) is the classic sign of a broken cache.
        assert len(set(out.outputs[0].token_ids)) > 3, text


def test_greedy_agreement_with_bf16(kvq_llm, kvq_outputs, bf16_reference):
    """KVQ picks the same greedy tokens as vLLM's bf16 backend.

    Free-running greedy outputs of a 135M model diverge at the first near-tie, and ties are
    common: vLLM's bf16 CPU backend itself flips ties that fp32 resolves the other way (its
    first token on prompt 4 is an exact tie). So the assertion is teacher-forced: feeding the
    bf16 continuation as the prompt (every position reads all earlier ones through the packed
    cache, as decoding does: vllm_kvq/exactness.py), KVQ's top-1 token must equal bf16's
    greedy token at >= 75% of positions. Measured 93.2% for the default (k4v3, 16-token window;
    +0.9% perplexity read this way, benchmarks/results/perplexity_issue14.json); k4v2 without a
    window, the default before, measured 79.8% (+15.8%). The bar stays at the weaker format's
    level so that the test checks the cache, not one format's quality; the free-running
    first-divergence figures are printed for the record.
    """
    rate = teacher_forced_top1(kvq_llm, bf16_reference["prompt_ids"], bf16_reference["tokens"])
    first_divergence = []
    for out, ref in zip(kvq_outputs, bf16_reference["tokens"]):
        got = list(out.outputs[0].token_ids)
        first_divergence.append(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b),
                                     min(len(got), len(ref))))
    print(f"teacher-forced top-1 agreement {rate:.2%}; "
          f"free-running first divergence at {first_divergence} of {MAX_TOKENS}")
    assert rate >= 0.75


def _token_prompt(tokenizer, text: str, length: int):
    from vllm.inputs import TokensPrompt

    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    assert len(ids) == length
    return TokensPrompt(prompt_token_ids=ids)


def test_prefix_cache_hit_equals_chunked_prefill(kvq_llm):
    """A request whose first two blocks come from the prefix cache gives exactly the output
    of the same request computed with chunked prefill split at the same boundary: both read
    the same packed prefix."""
    from vllm_kvq.assets import essays_text

    prompt = _token_prompt(kvq_llm.get_tokenizer(), essays_text()[150000:], CHUNK + 61)
    first = greedy(kvq_llm, [prompt], max_tokens=16)[0]  # chunks [0, 256) + [256, 317)
    second = greedy(kvq_llm, [prompt], max_tokens=16)[0]  # hits blocks 0-1, computes the rest
    assert (first.num_cached_tokens or 0) == 0
    assert second.num_cached_tokens == CHUNK
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    for a, b in zip(first.outputs[0].logprobs, second.outputs[0].logprobs):
        tok = next(iter(a))
        assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


def test_shared_prefix_blocks_do_not_corrupt_other_requests(kvq_llm):
    """Requests sharing cached prefix blocks, batched with unrelated requests, behave like
    each request run alone against the same cache."""
    from vllm.inputs import TokensPrompt

    from vllm_kvq.assets import essays_text

    tok = kvq_llm.get_tokenizer()
    shared = tok(essays_text()[200000:], add_special_tokens=False)["input_ids"][:CHUNK]
    suffixes = [" Summary:", " The key idea is", " In other words,"]
    prompts = [TokensPrompt(prompt_token_ids=shared + tok(s, add_special_tokens=False)[
        "input_ids"]) for s in suffixes]
    prompts += PROMPTS[:3]
    greedy(kvq_llm, prompts[:1], max_tokens=4)  # populate the cache with the shared blocks
    batched = greedy(kvq_llm, prompts, max_tokens=24, logprobs=5)
    assert all(o.num_cached_tokens == CHUNK for o in batched[:3])
    for prompt, out in zip(prompts, batched):
        alone = greedy(kvq_llm, [prompt], max_tokens=24, logprobs=5)[0]
        assert_close_to(alone, out)  # vLLM's batch-shape rounding, amplified (conftest.MOVE)
