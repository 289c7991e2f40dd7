"""Speculative decoding with n-gram proposals: greedy output with speculation against the
same engine's output without it, and the acceptance rate, for vLLM's bf16 CPU_ATTN backend
and KVQ rows.

Each row runs two engines on the same prompts (greedy, ``--tokens`` generated, EOS ignored so
every generation is long): without speculation, then with ``{"method": "ngram",
"num_speculative_tokens": S}``. Reported: generations equal token for token, the first
divergence of the others, the drafts' acceptance rate (accepted / proposed draft tokens, from
vLLM's own counters), tokens accepted per verification, and decode CPU time with over without
speculation (wall time of a second, warm pass; the two engines run one after the other in the
same process, so the ratio is only indicative on a shared machine).

KVQ reads the same positions packed and exactly with and without speculation (tests/
test_window.py); what can still differ is vLLM's own arithmetic: on CPU its K/V projections
round differently when a step verifies 4 tokens instead of decoding 1 (measured: 58 of 70
layer-20 key rows differ in the last bit under CPU_ATTN alike), and coarse codes turn a
last-bit change into a whole code step now and then.

    python benchmarks/speculative.py                 # bf16, k8v8, k4v3, k4v2; 8 x 256 tokens
    python benchmarks/speculative.py --quick         # bf16 + k4v3, 2 prompts x 32 tokens
"""

import argparse
import time

from common import close, open_llm, print_table, write_json

FULL = ["bf16", "k8v8", "k4v3", "k4v2"]


def make_prompts(num: int) -> list[str]:
    """Instructions and essay passages; n-gram drafts hit where output repeats its context."""
    from vllm_kvq.assets import essays_text

    text = essays_text()
    fixed = ["def fibonacci(n):\n", "The capital of France is",
             "Here is a short poem about the sea:\n", "List the numbers from 1 to 50:"]
    passages = [text[i * 9000:i * 9000 + 1800] + "\n\nRepeat the first sentence above, then "
                "summarize the passage:" for i in range(num)]
    return (fixed + passages)[:num]


def spec_counters(llm) -> dict:
    names = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens")
    return {m.name.split(":")[1]: m.value for m in llm.get_metrics() if m.name in names}


def run(name: str, prompts, tokens: int, speculative: int | None):
    from vllm import SamplingParams

    extra = {} if speculative is None else {"speculative_config": {
        "method": "ngram", "num_speculative_tokens": speculative, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2}}
    llm = open_llm(name, disable_log_stats=False, **extra)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    counters = spec_counters(llm)  # of the first pass
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)  # a second, timed pass (warm engine)
    wall = time.perf_counter() - start
    close(llm)
    return [list(o.outputs[0].token_ids) for o in outs], wall, counters


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=FULL)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--speculative-tokens", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="speculative")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.prompts, args.tokens = ["bf16", "k4v3"], 2, 32
    prompts = make_prompts(args.prompts)
    rows = []
    for name in args.rows:
        plain, wall_plain, _ = run(name, prompts, args.tokens, None)
        spec, wall_spec, c = run(name, prompts, args.tokens, args.speculative_tokens)
        divergences = [first_divergence(a, b) for a, b in zip(plain, spec)]
        drafted = c.get("spec_decode_num_draft_tokens", 0)
        accepted = c.get("spec_decode_num_accepted_tokens", 0)
        rows.append({
            "row": name,
            "equal": sum(d is None for d in divergences),
            "prompts": len(prompts),
            "first_divergences": [d for d in divergences if d is not None],
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "accepted_per_verification": round(
                accepted / c["spec_decode_num_drafts"], 2) if c.get(
                "spec_decode_num_drafts") else None,
            "draft_tokens": drafted,
            "wall_with_over_without": round(wall_spec / wall_plain, 2),
        })
        print(rows[-1], flush=True)
    for r in rows:
        r["divergences"] = ",".join(map(str, r["first_divergences"])) or "-"
    print_table(f"n-gram speculation ({args.speculative_tokens} drafts), {len(prompts)} prompts "
                f"x {args.tokens} tokens", rows,
                [("row", "row", ""), ("equal", "equal", "d"), ("divergences", "diverge at", ""),
                 ("acceptance_rate", "accepted", ".3f"),
                 ("accepted_per_verification", "per verify", ".2f"),
                 ("wall_with_over_without", "wall ratio", ".2f")])
    for r in rows:
        del r["divergences"]
    path = write_json(args.out, {"tokens": args.tokens, "speculative_tokens":
                                 args.speculative_tokens, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
