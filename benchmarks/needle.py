"""Needle in a haystack on the packaged Paul Graham essays: retrieval rate per preset.

A sentence "The secret passphrase is <5-digit number>." is inserted at a depth of a
haystack of essay text (taken from the START of the corpus; perplexity uses the end), then
the model is asked for it. Prompts are prefilled in chunks of ``--chunk`` tokens
(max_num_batched_tokens), so the needle sits in earlier chunks and is read back from the
packed cache, never only from the fresh-token attention. A cell counts as retrieved when the
greedy answer contains the number. bf16 (CPU_ATTN) runs first in the same run: SmolLM2-135M
is weak, and its own rate is the ceiling the presets are compared to.

    python benchmarks/needle.py                   # 4 lengths up to 7936 tokens x 3 depths x 2
    python benchmarks/needle.py --quick           # 1 length x 2 depths, bf16 + k4v2
"""

import argparse
import sys
import random
import time

from tqdm import tqdm

from common import close, print_table, try_open_llm, write_json

FULL = ["k8v4", "k4v4", "k4v2", "k2v2", "qjl256v4"]
QUESTION = ("\n\nQuestion: What is the secret passphrase mentioned in the text above?\n"
            "Answer: The secret passphrase is")


def build_prompts(tokenizer, lengths, depths, trials, seed=0):
    from vllm_kvq.assets import essays_text

    rng = random.Random(seed)
    hay = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    q_ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    cells = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                answer = str(rng.randint(10000, 99999))
                needle = tokenizer(f" The secret passphrase is {answer}. ",
                                   add_special_tokens=False)["input_ids"]
                n_hay = length - len(needle) - len(q_ids)
                at = int(depth * n_hay)
                ids = hay[:at] + needle + hay[at:n_hay] + q_ids
                cells.append({"length": length, "depth": depth, "trial": t, "answer": answer,
                              "ids": ids})
    return cells


def run_cells(llm, cells) -> list[bool]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=c["ids"]) for c in cells],
                        SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    return [c["answer"] in o.outputs[0].text for c, o in zip(cells, outs)]


def summarize(name: str, cells, hits) -> dict:
    row = {"preset": name, "rate": sum(hits) / len(hits), "n": len(hits), "by_length": {}}
    for length in sorted({c["length"] for c in cells}):
        h = [x for c, x in zip(cells, hits) if c["length"] == length]
        row["by_length"][str(length)] = sum(h) / len(h)
    row["hits"] = [int(x) for x in hits]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--lengths", nargs="+", type=int)
    parser.add_argument("--depths", nargs="+", type=float)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    presets = args.presets or (["k4v2"] if args.quick else FULL)
    lengths = args.lengths or ([1024] if args.quick else [1024, 2048, 4096, 7936])
    depths = args.depths or ([0.25, 0.75] if args.quick else [0.1, 0.5, 0.9])
    trials = args.trials or (1 if args.quick else 2)
    max_len = max(8192 if not args.quick else 2048, max(lengths) + 16)
    rows, cells, t0 = [], None, time.time()
    for name in tqdm(["bf16"] + presets, desc="engines"):
        llm, err = try_open_llm(name, max_model_len=max_len, max_num_batched_tokens=args.chunk,
                                enable_prefix_caching=False)
        if llm is None:
            rows.append({"preset": name, "error": err})
            continue
        if cells is None:
            cells = build_prompts(llm.get_tokenizer(), lengths, depths, trials)
        t = time.time()
        rows.append(summarize(name, cells, run_cells(llm, cells)))
        rows[-1]["seconds"] = time.time() - t
        close(llm)
    cols = [("preset", "preset", ""), ("rate", "overall", ".2f")]
    cols += [(f"len{n}", f"{n} tok", ".2f") for n in lengths]
    for r in rows:
        r.update({f"len{n}": r.get("by_length", {}).get(str(n)) for n in lengths})
    print_table(f"needle retrieval rate ({len(depths)} depths x {trials} trials per length, "
                f"prefill chunks of {args.chunk})", rows, cols)
    for r in rows:
        for n in lengths:
            r.pop(f"len{n}", None)
    argv = sys.argv[1:] if argv is None else argv
    payload = {"command": " ".join(["python benchmarks/needle.py", *argv]),
               "args": vars(args), "lengths": lengths, "depths": depths, "trials": trials,
               "seconds": time.time() - t0, "rows": rows}
    write_json(args.out or ("needle_quick" if args.quick else "needle"), payload)
    return payload


if __name__ == "__main__":
    main()
