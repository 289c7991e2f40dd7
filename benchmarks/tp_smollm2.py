"""SmolLM2-135M (3 KV heads, one per rank) at TP=3 against TP=1 on the mp executor (gloo),
KVQ rows beside bf16 (CPU_ATTN), every engine in the same run.

Two kinds of agreement with the same backend's TP=1 run:
- greedy: 12 essay prompts (48-512 tokens) x 32 new tokens; tokens matched up to each
  first divergence, and the largest logprob difference over the matched tokens;
- teacher-forced: 4 x 1024 essay tokens prefilled in 256-token chunks (later chunks read
  earlier ones from the cache); how often the top-1 prediction is the same token, the mean
  and largest |logprob difference| of the true next token, and the perplexity.
Beside them, each TP=3 run's teacher-forced top-1 agreement with bf16 TP=1 (accuracy), to
show whether splitting across ranks costs anything against the reference.

    python benchmarks/tp_smollm2.py                              # ~25 min on 2 cores
    python benchmarks/tp_smollm2.py --rows bf16 k4v2 --quick     # ~8 min

Not exercised in CI: three ranks of the real model on a 2-core machine take minutes per
engine; tests/e2e/test_tensor_parallel.py covers TP on a tiny model.
"""

import argparse
import math
import os
import sys

from tqdm import tqdm

from common import (agreement, close, essay_token_windows, open_llm, print_table,
                    teacher_forced, write_json)

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # 3 ranks, one NUMA node

PROMPT_LENGTHS = (48, 160, 512)


def run_engine(name: str, tp: int, num_prompts: int, num_windows: int) -> dict:
    """Greedy outputs and teacher-forced (top-1 token, true-token logprob) per position."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = open_llm(name, tensor_parallel_size=tp, distributed_executor_backend="mp",
                   max_model_len=2048, max_num_batched_tokens=256,
                   enable_prefix_caching=False)
    tokenizer = llm.get_tokenizer()
    starts = essay_token_windows(tokenizer, num_prompts, max(PROMPT_LENGTHS))
    prompts = [TokensPrompt(prompt_token_ids=w[:PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]])
               for i, w in enumerate(starts)]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, logprobs=1),
                          use_tqdm=False)
    forced = teacher_forced(llm, essay_token_windows(tokenizer, num_windows, 1024))
    close(llm)
    return {"greedy": greedy, "top1": [t for top1, _ in forced for t in top1],
            "true_lp": [lp for _, lps in forced for lp in lps]}


def compare(run: dict, base: dict, reference: dict) -> dict:
    """``run`` (TP=N) against ``base`` (same backend, TP=1); ``reference`` is bf16 TP=1."""
    match, worst = agreement(base["greedy"], run["greedy"])
    diffs = [abs(a - b) for a, b in zip(run["true_lp"], base["true_lp"])]
    same = sum(a == b for a, b in zip(run["top1"], base["top1"]))
    acc = sum(a == b for a, b in zip(run["top1"], reference["top1"]))
    n = len(diffs)
    return {"greedy_match": match, "greedy_max_lp_diff": worst,
            "forced_top1_agree": same / n, "forced_mean_lp_diff": sum(diffs) / n,
            "forced_max_lp_diff": max(diffs), "top1_vs_bf16_tp1": acc / n,
            "ppl": math.exp(-sum(run["true_lp"]) / n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["bf16", "k4v2", "auto5x+w64"])
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 prompts, 1 window")
    parser.add_argument("--out", default="tp_smollm2")
    args = parser.parse_args()
    if args.rows[0] != "bf16":
        parser.error("--rows must start with bf16 (the reference)")
    prompts, windows = (3, 1) if args.quick else (12, 4)
    runs = {(name, tp): run_engine(name, tp, prompts, windows)
            for name in tqdm(args.rows, desc="rows") for tp in (1, args.tp)}
    reference = runs["bf16", 1]
    rows = []
    for name in args.rows:
        for tp in (1, args.tp):
            rows.append({"row": name, "tp": tp,
                         **compare(runs[name, tp], runs[name, 1], reference)})
    print_table(f"SmolLM2-135M, TP={args.tp} vs TP=1 of the same row (mp executor, gloo)", rows,
                [("row", "row", ""), ("tp", "TP", "d"), ("greedy_match", "greedy", ".1%"),
                 ("greedy_max_lp_diff", "greedy dlp", ".3f"),
                 ("forced_top1_agree", "forced top1", ".2%"),
                 ("forced_mean_lp_diff", "mean dlp", ".4f"),
                 ("forced_max_lp_diff", "max dlp", ".3f"),
                 ("top1_vs_bf16_tp1", "top1 vs bf16", ".2%"), ("ppl", "ppl", ".3f")])
    write_json(args.out, {"command": " ".join(["python benchmarks/tp_smollm2.py", *sys.argv[1:]]),
                          "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
