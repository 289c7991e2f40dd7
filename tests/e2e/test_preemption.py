"""A KV budget so small that the scheduler must preempt: outputs stay intact.

Nine 128-token blocks (one is vLLM's null block) for four requests that need 16 blocks,
so requests are preempted and later recomputed from their prompt and generated tokens.
"""

from vllm_kvq.config import DEFAULT_PRESET

from .conftest import greedy, make_llm, self_consistency, shutdown

BLOCK_BYTES = 30 * 3 * 128 * 64  # layers x KV heads x block tokens x k4v2 slot bytes


def _preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def test_preemption_keeps_outputs_intact():
    from vllm_kvq.assets import essays_text

    llm = make_llm("KVQ", {"preset": DEFAULT_PRESET}, kv_cache_memory_bytes=9 * BLOCK_BYTES,
                   max_model_len=1024, disable_log_stats=False)
    try:
        assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == 9
        text = essays_text()
        prompts = [text[i * 7000:i * 7000 + 800] for i in range(4)]  # < 256 tokens each
        # Four prompts of 2 blocks fill the 8 usable blocks; each then needs 2 more blocks
        # for its 200 generated tokens, which forces preemptions while decoding.
        alone = [greedy(llm, [p], max_tokens=200, ignore_eos=True)[0] for p in prompts]
        assert _preemptions(llm) == 0
        together = greedy(llm, prompts, max_tokens=200, ignore_eos=True)
        assert _preemptions(llm) > 0
        # Judge each generation by teacher forcing through the same engine, one request at a
        # time (no preemption; the whole sequence is one exact prefill chunk): the fraction
        # of generated tokens that are the model's top-1 given their prefix. Greedy output
        # scores ~1.0; corrupted blocks after a preemption would produce tokens the clean
        # model does not predict.
        alone_rate = self_consistency(llm, alone)
        together_rate = self_consistency(llm, together)
    finally:
        shutdown(llm)
    print(f"teacher-forced top-1 rate: alone {alone_rate:.3f}, with preemption "
          f"{together_rate:.3f}")
    # Recompute after preemption legitimately changes which tokens were read packed
    # (past-only quantization), so texts may diverge at near-ties; they must stay tokens the
    # model itself predicts.
    assert together_rate >= 0.9
    assert together_rate >= alone_rate - 0.05
