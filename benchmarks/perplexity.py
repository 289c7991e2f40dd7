"""Chunked-prefill perplexity on the essays: bf16 beside each KVQ preset, same run.

A prompt is processed in chunks of ``--chunk`` tokens (vLLM's max_num_batched_tokens), so
every chunk after the first reads all earlier chunks from the packed cache: the perplexity
measures the cache, not just the fresh-token attention.

    python benchmarks/perplexity.py --presets k4v4 k4v2 k2v2 --windows 4 --window 2048
    python benchmarks/perplexity.py --presets kivi2+w64 asymkv15/15 auto5x auto5x+w64 \
        --out perplexity_issue6       # rows of benchmarks/common.py NAMED, "+w<R>": window R
    KVQ_BENCH_MODEL=gemma3 python benchmarks/perplexity.py --presets k4v3 k4v4 \
        --out perplexity_gemma3       # Gemma 3 270M: 2048-token windows cross its 512 window
"""

import argparse
import math
import os
import sys

from tqdm import tqdm

from common import close, essay_token_windows, open_llm, teacher_forced, write_json


def chunked_perplexity(llm, windows: list[list[int]]) -> float:
    true_lp = [lp for _, lps in teacher_forced(llm, windows) for lp in lps]
    return math.exp(-sum(true_lp) / len(true_lp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["k8v4", "k4v4", "k4v2", "k2v2",
                                                         "qjl256v4", "qjl128v2"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--out", default="perplexity")
    args = parser.parse_args()
    rows = []
    for name in tqdm(["bf16"] + args.presets, desc="backends"):
        llm = open_llm(name, max_num_batched_tokens=args.chunk, enable_prefix_caching=False)
        windows = essay_token_windows(llm.get_tokenizer(), args.windows, args.window)
        ppl = chunked_perplexity(llm, windows)
        close(llm)
        rows.append({"preset": name, "ppl": ppl, "delta_pct": 100 * (ppl / rows[0]["ppl"] - 1)
                     if rows else 0.0})
        # written after every row: a long run that stops early keeps what it measured
        write_json(args.out, {"command": "python benchmarks/perplexity.py " + " ".join(
            sys.argv[1:]), "model": os.environ.get("KVQ_BENCH_MODEL", "smollm2"),
            "args": vars(args), "rows": rows})
    print(f"\nchunked-prefill perplexity, {args.windows} x {args.window} tokens, "
          f"chunks of {args.chunk}")
    print(f"{'preset':<20} {'ppl':>8} {'vs bf16':>8}")
    for r in rows:
        print(f"{r['preset']:<20} {r['ppl']:8.3f} {r['delta_pct']:+7.2f}%")

if __name__ == "__main__":
    main()
