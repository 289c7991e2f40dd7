"""SmolLM2-135M (3 KV heads, one per rank) at TP=3 vs TP=1 on the mp executor (gloo): greedy
token match up to each first divergence and the largest logprob difference there, KVQ k4v2
beside bf16 (CPU_ATTN); with ``--perplexity``, chunked-prefill perplexity at TP=1 and TP=3.

    python benchmarks/tp_smollm2.py                 # ~5 min on 2 cores
    python benchmarks/tp_smollm2.py --perplexity    # ~3 min
"""

import os
import sys

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # 3 ranks, one NUMA node

PROMPTS = ["The capital of France is", "Here is a short poem about the sea:\n",
           "Three tips for staying healthy are"]
BACKENDS = ("KVQ", "CPU_ATTN")


def make_llm(backend: str, tp: int, **kwargs):
    from vllm import LLM

    from vllm_kvq.assets import smollm2_path

    extra = {"additional_config": {"kvq": {"preset": "k4v2"}}} if backend == "KVQ" else {}
    return LLM(model=smollm2_path(), attention_backend=backend, tensor_parallel_size=tp,
               distributed_executor_backend="mp", enforce_eager=True, seed=0,
               kv_cache_memory_bytes=64 << 20, **extra, **kwargs)


def greedy_by_tp() -> None:
    from vllm import SamplingParams

    from common import agreement

    params = SamplingParams(temperature=0, max_tokens=24, logprobs=1)
    outs = {}
    for backend in BACKENDS:
        for tp in (1, 3):
            llm = make_llm(backend, tp, max_model_len=1024)
            outs[backend, tp] = llm.generate(PROMPTS, params, use_tqdm=False)
            llm.llm_engine.engine_core.shutdown()
    for backend in BACKENDS:
        match, worst = agreement(outs[backend, 1], outs[backend, 3])
        print(f"SmolLM2 {backend}: TP=3 vs TP=1 token match {match:.2%}, "
              f"max logprob diff {worst:.3f}")


def perplexity_by_tp() -> None:
    from common import close, essay_token_windows
    from perplexity import chunked_perplexity

    for backend in BACKENDS:
        for tp in (1, 3):
            llm = make_llm(backend, tp, max_model_len=2048, max_num_batched_tokens=256,
                           enable_prefix_caching=False)
            windows = essay_token_windows(llm.get_tokenizer(), 1, 1024)
            print(f"PPL {backend} TP={tp}: {chunked_perplexity(llm, windows):.4f}", flush=True)
            close(llm)


if __name__ == "__main__":
    perplexity_by_tp() if "--perplexity" in sys.argv else greedy_by_tp()
