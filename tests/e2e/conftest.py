"""End-to-end fixtures: real vLLM engines on the bundled SmolLM2-135M model.

Engines are expensive (~25 s each on 2 cores), so each test module shares one engine
(module scope) and the bf16 reference outputs are computed once per session.
"""

import gc
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvq.assets import essays_text, smollm2_path

# The benchmarks' metrics (benchmarks/common.py), so tests and benchmarks measure alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import teacher_forced  # noqa: E402

pytestmark = pytest.mark.e2e

KV_BUDGET = 256 << 20
# vLLM's CPU GEMMs run bf16 natively only with AVX-512 BF16 (and AMX); on AVX2 hosts (AMD EPYC
# before Zen 4, for one) a bf16 linear of this model's shape runs about 5x slower than fp32
# (measured, 2 cores: 256x576 by 576x1536 in 64 ms bf16, 13 ms fp32), which put the suite past
# CI's limit. There the engines run the model in fp32, and KVQ attends as it does for the bf16
# model (``vllm_kvq.backend.attention_dtype``); CPU_ATTN references then run fp32 too.
MODEL_DTYPE = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
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


def token_prompts(tokenizer, lengths: list[int]) -> list:
    """Essay passages of exactly these token counts, as token prompts."""
    from vllm.inputs import TokensPrompt

    ids = tokenizer(essays_text()[30000:70000], add_special_tokens=False)["input_ids"]
    return [TokensPrompt(prompt_token_ids=ids[i * 1000:i * 1000 + n])
            for i, n in enumerate(lengths)]


def make_llm(backend: str, kvq: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(model=smollm2_path(), attention_backend=backend, max_model_len=4096,
                kv_cache_memory_bytes=KV_BUDGET, enforce_eager=True, seed=0, dtype=MODEL_DTYPE)
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


def _forced_matches(llm, prompt_ids, continuations) -> tuple[int, int]:
    forced = teacher_forced(llm, [list(p) + list(c) for p, c in zip(prompt_ids, continuations)])
    match = sum(a == b for (top1, _), p, c in zip(forced, prompt_ids, continuations)
                for a, b in zip(top1[len(p) - 1:], c))
    return match, sum(len(c) for c in continuations)


def teacher_forced_top1(llm, prompt_ids: list[list[int]], continuations: list[list[int]]) -> float:
    """Fraction of continuation tokens that are ``llm``'s own top-1 prediction when the
    prompt plus continuation is prefilled (so later tokens read earlier ones from the cache)."""
    match, total = _forced_matches(llm, prompt_ids, continuations)
    return match / total


def self_consistency(llm, outputs) -> float:
    """Teacher-forced top-1 rate of generations against the engine that made them, one request
    at a time (no preemption while judging): a corrupted cache makes an engine emit text it
    does not itself predict."""
    counts = [_forced_matches(llm, [o.prompt_token_ids], [o.outputs[0].token_ids])
              for o in outputs]
    return sum(m for m, _ in counts) / sum(t for _, t in counts)


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


# How far a greedy answer may move when only vLLM's rounding changes (another batch shape):
# KVQ amplifies it (a rounding difference moves a code by a whole step). Measured on
# test_cache_state.py's prompts, solo vs two batched runs: agreeing tokens' logprobs moved by
# up to 1.18 nats, answers diverged at solo top-2 gaps up to 0.75 (bf16: 0.21 and 0.125).
# 3 nats is 2.5x the largest seen; corruption moves whole nats on most tokens, which the
# self-consistency checks catch.
MOVE = 3.0


def assert_close_to(reference, other, move: float = MOVE) -> None:
    """Greedy tokens compared (both generated with logprobs=5): equal until a divergence that
    the reference rated among its top 5, with the agreeing tokens' logprobs within ``move``."""
    ta, tb = reference.outputs[0].token_ids, other.outputs[0].token_ids
    for j, (x, y) in enumerate(zip(ta, tb)):
        la, lb = reference.outputs[0].logprobs[j], other.outputs[0].logprobs[j]
        if x != y:
            assert y in la, (j, la, lb)
            return
        assert abs(la[x].logprob - lb[y].logprob) < move, (j, la, lb)
