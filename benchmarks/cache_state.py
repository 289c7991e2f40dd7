"""Does a greedy answer depend on the prefix cache or on what shares the batch?

Eight chat prompts (essay passages of 150-2,000 tokens and a question about them) run, per
row, four ways on one engine with vLLM's prefix caching on: each alone on an empty cache
(cold), each alone again right after (its full blocks now hit the cache), all together on an
empty cache, and all together again (cached). The table counts the prompts whose greedy
answer equals its cold solo answer, and the first generated token at which each differs.
bf16 (CPU_ATTN) runs first: vLLM's CPU kernels are not batch-invariant either, so its
together-vs-alone count is the floor the KVQ rows are compared with.

    python benchmarks/cache_state.py                        # bf16, k4v2, the 5x policy
    python benchmarks/cache_state.py --rows bf16 k4v2 k4v2:prefill_exact --max-tokens 32

A row "<name>:prefill_exact" runs the older chunk-level semantics (a prompt attends to its
own chunk exactly), whose answers change on a cache hit.
"""

import argparse
import sys

from tqdm import tqdm

from common import backend_for, close, make_llm, print_table, write_json

QUESTIONS = ["What is the main point of this passage?", "Summarize the passage in one sentence.",
             "What does the author recommend?", "Which example does the author give first?"]
LENGTHS = [150, 300, 450, 700, 900, 1200, 1600, 2000]  # passage tokens


def chat_prompts(tokenizer) -> list[list[int]]:
    from vllm_kvq.assets import essays_text

    ids = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    prompts, start = [], 5000
    for i, n in enumerate(LENGTHS):
        passage = tokenizer.decode(ids[start:start + n])
        start += n + 997
        msgs = [{"role": "user", "content": f"{passage}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def _generate(llm, prompts, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.num_cached_tokens or 0) for o in outs]


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(name: str, prompts, max_tokens: int) -> dict:
    backend, kvq, extra = backend_for(name)
    llm = make_llm(backend, kvq, enable_prefix_caching=True, **extra)
    cold, cached = [], []
    for p in prompts:
        llm.reset_prefix_cache()
        cold.append(_generate(llm, [p], max_tokens)[0])
        cached.append(_generate(llm, [p], max_tokens)[0])
    llm.reset_prefix_cache()
    together_cold = _generate(llm, prompts, max_tokens)
    together_cached = _generate(llm, prompts, max_tokens)
    close(llm)
    row = {"row": name}
    for label, run in (("cached", cached), ("together", together_cold),
                       ("together_cached", together_cached)):
        diffs = [first_difference(c[0], r[0]) for c, r in zip(cold, run)]
        row[f"{label}_equal"] = sum(d is None for d in diffs)
        row[f"{label}_first_diff"] = diffs
        row[f"{label}_hit_tokens"] = [r[1] for r in run]
    row["cold_empty_answers"] = sum(len(c[0]) == 0 for c in cold)
    row["cached_empty_answers"] = sum(len(c[0]) == 0 for c in cached)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["bf16", "k4v2", "k4v2:prefill_exact",
                                                      "auto5x+w64", "auto5x+w64:prefill_exact"])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default="cache_state")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from vllm_kvq.assets import smollm2_path

    prompts = chat_prompts(AutoTokenizer.from_pretrained(smollm2_path()))
    rows = []
    for name in tqdm(args.rows, desc="rows"):
        rows.append(measure(name, prompts, args.max_tokens))
        write_json(args.out, {"command": "python benchmarks/cache_state.py " + " ".join(
            sys.argv[1:]), "prompt_tokens": [len(p) for p in prompts], "rows": rows})
    n = len(prompts)
    print_table(f"greedy answers equal to the cold solo answer (of {n}), {args.max_tokens} "
                "tokens", rows,
                [("row", "row", "s"), ("cached_equal", "cached alone", "d"),
                 ("together_equal", "together", "d"),
                 ("together_cached_equal", "together, cached", "d")])


if __name__ == "__main__":
    main()
