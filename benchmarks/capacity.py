"""Capacity: bytes per token-head, bits per element and KV tokens at a fixed KV budget.

The token count is vLLM's own ("KV cache size: N tokens" = blocks x block size), read from
an engine started with ``kv_cache_memory_bytes=--budget-mib``; bf16 (CPU_ATTN) and vLLM's
fp8 KV cache are measured in the same run as the KVQ presets. A row with an exact recent
window (``<name>+w<R>``) pays for its ring out of the same budget: its engine gets the budget
minus the ring (R bf16 tokens for each of ``--max-num-seqs`` request slots), so every row is
tokens at the same total memory.

    python benchmarks/capacity.py                 # every preset, 256 MiB budget
    python benchmarks/capacity.py --presets kivi2+w64 asymkv15/15 auto5x auto6.4x+w64
    python benchmarks/capacity.py --quick         # bf16 + k4v2, 32 MiB
"""

import argparse
import sys
import time

from tqdm import tqdm

from common import (close, kv_capacity_tokens, print_table, slot_bytes, try_open_llm,
                    window_ring_mib, write_json)

FULL = ["k8v4", "k4v4", "k4v2", "k2v2", "qjl256v4", "qjl256v2", "qjl128v2"]
QUICK = ["k4v2"]
COLS = [("preset", "preset", ""), ("slot_bytes", "B/tok-head", ".1f"),
        ("bits_per_element", "bits/elem", ".2f"), ("format_ratio", "format x", ".2f"),
        ("ring_mib", "ring MiB", ".1f"), ("kv_tokens", "KV tokens", "d"),
        ("ratio", "vs bf16", ".2f")]


def measure(llm, name: str, ring_mib: float) -> dict:
    model = llm.llm_engine.vllm_config.model_config
    head_size = model.get_head_size()
    b = slot_bytes(name, head_size, model.hf_text_config.num_hidden_layers)
    return {"preset": name, "head_size": head_size, "slot_bytes": b,
            "bits_per_element": b * 8 / (2 * head_size), "format_ratio": 4 * head_size / b,
            "ring_mib": ring_mib, "kv_tokens": kv_capacity_tokens(llm)}


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
    parser.add_argument("--max-num-seqs", type=int, default=16,
                        help="request slots (the exact window's ring has one per slot)")
    parser.add_argument("--no-fp8", action="store_true", help="skip the fp8 reference row")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    presets = args.presets or (QUICK if args.quick else FULL)
    budget = args.budget_mib or (32 if args.quick else 256)
    refs = ["bf16"] + ([] if args.no_fp8 or args.quick else ["fp8"])
    rows, t0 = [], time.time()
    for name in tqdm(refs + presets, desc="engines"):
        ring = window_ring_mib(name, args.max_num_seqs)
        llm, err = try_open_llm(name, kv_cache_memory_bytes=int((budget - ring) * 2**20),
                                max_model_len=1024 if args.quick else 4096,
                                max_num_seqs=args.max_num_seqs)
        if llm is None:
            rows.append({"preset": name, "error": err})
            continue
        rows.append(measure(llm, name, ring))
        close(llm)
    finish(rows)
    print_table(f"KV capacity at a {budget} MiB KV budget, window ring included (SmolLM2-135M, "
                f"30 layers x 3 KV heads, {args.max_num_seqs} request slots)", rows, COLS)
    for r in rows:
        if "error" in r:
            print(f"{r['preset']}: not run: {r['error']}")
    argv = sys.argv[1:] if argv is None else argv
    payload = {"command": " ".join(["python benchmarks/capacity.py", *argv]),
               "args": vars(args), "budget_mib": budget, "seconds": time.time() - t0,
               "rows": rows}
    write_json(args.out or ("capacity_quick" if args.quick else "capacity"), payload)
    return payload


if __name__ == "__main__":
    main()
