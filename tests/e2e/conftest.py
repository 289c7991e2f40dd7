"""End-to-end fixtures: real vLLM engines on the bundled SmolLM2-135M model.

Engines are expensive (~25 s each on 2 cores), so each test module shares one engine
(module scope) and the bf16 reference outputs are computed once per session.
"""

import gc

import pytest

from vllm_kvq.assets import essays_text, smollm2_path

pytestmark = pytest.mark.e2e

KV_BUDGET = 256 << 20
MAX_TOKENS = 48
BLOCK = 128  # the CPU platform's default block size


def _prompts() -> list[str]:
    text = essays_text()
    return [
        "The capital of France is",
        "Here is a short poem about the sea:\n",
        "Three tips for staying healthy are",
        "def fibonacci(n):\n",
        # Long prompts: generation then reads hundreds of packed tokens back.
        text[:2500] + "\n\nTo summarize, the author says that",
        text[20000:24000] + "\n\nThe main point of this passage is",
        text[60000:61500] + "\n\nQuestion: what is this text about?\nAnswer:",
        text[90000:92000],
    ]


PROMPTS = _prompts()


def make_llm(backend: str, kvq: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(model=smollm2_path(), attention_backend=backend, max_model_len=4096,
                kv_cache_memory_bytes=KV_BUDGET, enforce_eager=True, seed=0)
    args.update(kwargs)
    if kvq is not None:
        args["additional_config"] = {"kvq": kvq}
    return LLM(**args)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def capacity_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def greedy(llm, prompts, max_tokens=MAX_TOKENS, logprobs=1, **params):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs, **params)
    return llm.generate(prompts, sp, use_tqdm=False)


@pytest.fixture(scope="session")
def bf16_reference():
    """Greedy outputs and capacity of vLLM's own bf16 CPU backend at the same KV budget."""
    llm = make_llm("CPU_ATTN")
    outs = greedy(llm, PROMPTS)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "prompt_ids": [list(o.prompt_token_ids) for o in outs],
              "texts": [o.outputs[0].text for o in outs],
              "capacity": capacity_tokens(llm)}
    shutdown(llm)
    return result
