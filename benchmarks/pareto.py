"""Pareto chart: KV capacity ratio vs chunked-prefill perplexity increase, one point per preset.

Reads benchmarks/results/capacity.json (vLLM-reported KV tokens at a fixed budget, ratio to
bf16) and benchmarks/results/perplexity.json (chunked-prefill perplexity, bf16 in the same
run); bf16 is the (1x, 0%) reference. vLLM's fp8 KV cache is drawn when
benchmarks/results/perplexity_fp8.json exists: ``--measure-fp8`` makes it (bf16 and fp8 in
one run, with the settings recorded in perplexity.json).

    python benchmarks/pareto.py                   # -> benchmarks/results/pareto.png
"""

import argparse
import json
import math

from common import RESULTS, write_json


def load(name: str, results=RESULTS) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def measure_fp8() -> None:
    from perplexity import chunked_perplexity

    from common import close, essay_token_windows, open_llm, try_open_llm

    a = load("perplexity")["args"]
    rows = []
    for name in ("bf16", "fp8"):
        opener = open_llm if name == "bf16" else try_open_llm
        got = opener(name, max_num_batched_tokens=a["chunk"], enable_prefix_caching=False)
        llm, err = got if isinstance(got, tuple) else (got, None)
        if llm is None:
            rows.append({"preset": name, "error": err})
            continue
        windows = essay_token_windows(llm.get_tokenizer(), a["windows"], a["window"])
        rows.append({"preset": name, "ppl": chunked_perplexity(llm, windows)})
        close(llm)
    for r in rows:
        if "ppl" in r:
            r["delta_pct"] = 100 * (r["ppl"] / rows[0]["ppl"] - 1)
    print(rows)
    write_json("perplexity_fp8", {"command": "python benchmarks/pareto.py --measure-fp8",
                                  "args": a, "rows": rows})


def points(results=RESULTS) -> list[dict]:
    cap = {r["preset"]: r for r in load("capacity", results)["rows"]}
    ppl = {r["preset"]: r for r in load("perplexity", results)["rows"]}
    fp8 = load("perplexity_fp8", results)
    if fp8:
        ppl.update({r["preset"]: r for r in fp8["rows"] if r["preset"] == "fp8" and "ppl" in r})
    out = []
    for name, p in ppl.items():
        c = cap.get(name)
        if c is None or c.get("ratio") is None:
            continue
        out.append({"preset": name, "capacity_ratio": c["ratio"],
                    "ppl_increase_pct": 0.0 if name == "bf16" else p["delta_pct"]})
    return out


def plot(pts: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for p in pts:
        ref = p["preset"] in ("bf16", "fp8")
        ax.scatter(p["capacity_ratio"], p["ppl_increase_pct"], s=60,
                   marker="s" if ref else "o", color="gray" if ref else "tab:blue", zorder=3)
        ax.annotate(p["preset"], (p["capacity_ratio"], p["ppl_increase_pct"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    # Pareto frontier: no other point has both more capacity and less loss.
    front = sorted((p for p in pts if not any(
        o["capacity_ratio"] >= p["capacity_ratio"] and o["ppl_increase_pct"] < p["ppl_increase_pct"]
        or o["capacity_ratio"] > p["capacity_ratio"] and o["ppl_increase_pct"] <= p["ppl_increase_pct"]
        for o in pts)), key=lambda p: p["capacity_ratio"])
    ax.plot([p["capacity_ratio"] for p in front], [p["ppl_increase_pct"] for p in front],
            "--", color="tab:orange", lw=1, label="Pareto frontier", zorder=2)
    ax.set_yscale("symlog", linthresh=0.1)
    top = max(p["ppl_increase_pct"] for p in pts)
    ax.set_ylim(-0.02, 10 ** math.ceil(math.log10(max(top, 1)) + 0.3))
    ax.set_xlabel("KV tokens at the same memory, x bf16 (vLLM-reported)")
    ax.set_ylabel("chunked-prefill perplexity increase, %")
    ax.set_title("KVQ presets on SmolLM2-135M (head size 64): capacity vs accuracy loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-fp8", action="store_true",
                        help="first measure fp8 (and bf16) chunked perplexity")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", help="PNG path (default: <results>/pareto.png)")
    args = parser.parse_args(argv)
    if args.measure_fp8:
        measure_fp8()
    from pathlib import Path

    results = Path(args.results)
    pts = points(results)
    out = Path(args.out) if args.out else results / "pareto.png"
    plot(pts, out)
    print(f"{'preset':<10} {'capacity x':>10} {'ppl +%':>8}")
    for p in sorted(pts, key=lambda p: p["capacity_ratio"]):
        print(f"{p['preset']:<10} {p['capacity_ratio']:10.2f} {p['ppl_increase_pct']:8.2f}")
    print(f"wrote {out}")
    return pts


if __name__ == "__main__":
    main()
