"""Capacity: bytes per token-head, bits per element and KV tokens at a fixed KV budget.

The token count is vLLM's own ("KV cache size: N tokens" = blocks x block size), read from
an engine started with ``kv_cache_memory_bytes=--budget-mib``; bf16 (CPU_ATTN) and vLLM's
fp8 KV cache are measured in the same run as the KVQ presets.

    python benchmarks/capacity.py                 # every preset, 256 MiB budget
    python benchmarks/capacity.py --quick         # bf16 + k4v2, 32 MiB
"""

import argparse
import time

from tqdm import tqdm

from common import close, kv_capacity_tokens, print_table, slot_bytes, try_open_llm, write_json

FULL = ["k8v4", "k4v4", "k4v2", "k2v2", "qjl256v4", "qjl256v2", "qjl128v2"]
QUICK = ["k4v2"]
COLS = [("preset", "preset", ""), ("slot_bytes", "B/tok-head", "d"),
        ("bits_per_element", "bits/elem", ".2f"), ("format_ratio", "format x", ".2f"),
        ("kv_tokens", "KV tokens", "d"), ("ratio", "vs bf16", ".2f")]


def measure(llm, name: str) -> dict:
    head_size = llm.llm_engine.vllm_config.model_config.get_head_size()
    b = slot_bytes(name, head_size)
    return {"preset": name, "head_size": head_size, "slot_bytes": b,
            "bits_per_element": b * 8 / (2 * head_size), "format_ratio": 4 * head_size / b,
            "kv_tokens": kv_capacity_tokens(llm)}


def finish(rows: list[dict]) -> list[dict]:
    base = next(r["kv_tokens"] for r in rows if r["preset"] == "bf16")
    for r in rows:
        if r.get("kv_tokens") is not None:
            r["ratio"] = r["kv_tokens"] / base
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--budget-mib", type=int)
    parser.add_argument("--no-fp8", action="store_true", help="skip the fp8 reference row")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    presets = args.presets or (QUICK if args.quick else FULL)
    budget = args.budget_mib or (32 if args.quick else 256)
    refs = ["bf16"] + ([] if args.no_fp8 or args.quick else ["fp8"])
    rows, t0 = [], time.time()
    for name in tqdm(refs + presets, desc="engines"):
        llm, err = try_open_llm(name, kv_cache_memory_bytes=budget << 20,
                                max_model_len=1024 if args.quick else 4096)
        if llm is None:
            rows.append({"preset": name, "error": err})
            continue
        rows.append(measure(llm, name))
        close(llm)
    finish(rows)
    print_table(f"KV capacity at a {budget} MiB KV budget (SmolLM2-135M, 30 layers x 3 KV heads)",
                rows, COLS)
    for r in rows:
        if "error" in r:
            print(f"{r['preset']}: not run: {r['error']}")
    payload = {"command": "python benchmarks/capacity.py" + (" --quick" if args.quick else ""),
               "args": vars(args), "budget_mib": budget, "seconds": time.time() - t0,
               "rows": rows}
    write_json(args.out or ("capacity_quick" if args.quick else "capacity"), payload)
    return payload


if __name__ == "__main__":
    main()
