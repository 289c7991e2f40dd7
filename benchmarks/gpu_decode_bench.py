"""Decode-kernel timings on a GPU: KVQ packed formats vs a bf16 paged decode.

For every preset, batch size and context length it times one decode step of one attention
layer (``vllm_kvq.kernels.api.decode_attention``: query preparation, split-K packed-context
kernel, LSE merge) with ``triton.testing.do_bench`` (median), and the same call on the
``bf16`` preset -- the same kernels reading raw bf16 K/V pages, i.e. a Triton bf16 paged
decode of identical structure -- and prints the ratio (>1: the packed format is faster).
Optionally (``--sdpa``) it also times torch SDPA on the gathered bf16 pages.

Usage: ``python benchmarks/gpu_decode_bench.py [--presets k4v2,qjl256v4] [--batches 1,8,32,64]
[--contexts 1024,4096,16384,65536]``. Results go to ``benchmarks/results/gpu_decode_bench.json``.
On a machine without a CUDA GPU it prints one line saying so and exits 0.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from checkout import ROOT, kernel_module  # benchmarks/checkout.py: runs from a bare checkout

RESULTS = ROOT / "benchmarks" / "results" / "gpu_decode_bench.json"


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def make_cache(preset: str, head_size: int, kv_heads: int, batch: int, context: int,
               block_size: int, dtype, device, seed_tokens: int = 4096):
    """A filled packed cache for ``batch`` requests of ``context`` tokens (shuffled blocks).

    ``seed_tokens`` random tokens are encoded with the store kernel and their slots tiled over
    the whole cache, so every slot holds a valid encoding without encoding millions of tokens.
    """
    import torch

    from vllm_kvq.config import PRESETS
    from vllm_kvq.formats import build_codecs

    api = kernel_module("api")

    fmt = PRESETS[preset]
    kc, vc = build_codecs(fmt, head_size, dtype, 0, 0, list(range(kv_heads)))
    kc, vc = kc.to(device), vc.to(device)
    sb = fmt.slot_bytes(head_size)
    per_req = -(-context // block_size)
    num_blocks = batch * per_req
    seed_blocks = -(-seed_tokens // block_size)
    seed = torch.zeros(seed_blocks, kv_heads, block_size, sb, dtype=torch.uint8, device=device)
    n = seed_blocks * block_size
    k = torch.randn(n, kv_heads, head_size, device=device).to(dtype)
    v = torch.randn(n, kv_heads, head_size, device=device).to(dtype)
    api.store_slots(k, v, seed, torch.arange(n, device=device), kc, vc)
    cache = torch.empty(num_blocks, kv_heads, block_size, sb, dtype=torch.uint8, device=device)
    for start in range(0, num_blocks, seed_blocks):
        stop = min(num_blocks, start + seed_blocks)
        cache[start:stop] = seed[:stop - start]
    table = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(batch, per_req)
    return kc, vc, cache, table


def bench_one(preset, batch, context, args, device):
    import torch
    import triton

    api = kernel_module("api")
    default_num_splits = kernel_module("launch").default_num_splits

    dtype = torch.bfloat16
    d, h, g = args.head_size, args.kv_heads, args.gqa
    kc, vc, cache, table = make_cache(preset, d, h, batch, context, args.block_size, dtype,
                                      device)
    q = torch.randn(batch, h * g, d, device=device, dtype=dtype)
    k = torch.randn(batch, h, d, device=device, dtype=dtype)
    v = torch.randn(batch, h, d, device=device, dtype=dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    splits = args.splits or default_num_splits(batch, h, context, args.block_size)
    out = torch.empty(batch, h * g, d, dtype=torch.float32, device=device)

    def step():
        api.decode_attention(q, k, v, cache, table, lens, kc, vc, d ** -0.5,
                             num_splits=splits, out=out)

    step()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(step, warmup=args.warmup, rep=args.rep, return_mode="median")
    bytes_read = batch * h * context * cache.shape[-1]
    del cache
    torch.cuda.empty_cache()
    return {"ms": ms, "splits": splits, "slot_bytes": kc.nbytes + vc.nbytes,
            "gbps": bytes_read / ms / 1e6}


def bench_sdpa(batch, context, args, device):
    """torch SDPA over bf16 K/V gathered from pages (gather included in the time)."""
    import torch
    import torch.nn.functional as F
    import triton

    d, h, g, bs = args.head_size, args.kv_heads, args.gqa, args.block_size
    per_req = -(-context // bs)
    kpages = torch.randn(batch * per_req, h, bs, d, device=device, dtype=torch.bfloat16)
    vpages = torch.randn_like(kpages)
    table = torch.randperm(batch * per_req, device=device).view(batch, per_req)
    q = torch.randn(batch, h * g, 1, d, device=device, dtype=torch.bfloat16)

    def step():
        kk = kpages[table].permute(0, 2, 1, 3, 4).reshape(batch, h, per_req * bs, d)
        vv = vpages[table].permute(0, 2, 1, 3, 4).reshape(batch, h, per_req * bs, d)
        F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

    return triton.testing.do_bench(step, warmup=args.warmup, rep=args.rep, return_mode="median")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="k4v4,k4v2,k2v2,qjl256v4,qjl128v2")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--splits", type=int, default=0, help="0: the backend's default")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--max-gib", type=float, default=24.0,
                    help="skip shapes whose bf16 KV would exceed this (per layer)")
    ap.add_argument("--sdpa", action="store_true", help="also time torch SDPA on gathered pages")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    if not torch.cuda.is_available():
        print("gpu_decode_bench: no CUDA GPU on this machine; nothing to time (run it on an "
              "H100/A100 host).")
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    presets = [p for p in args.presets.split(",") if p]
    rows = []
    t0 = time.time()
    print(f"device: {name}; D={args.head_size} kv_heads={args.kv_heads} gqa={args.gqa} "
          f"block={args.block_size}; one layer, one decode step, median of do_bench")
    print(f"{'preset':10} {'batch':>5} {'context':>7} {'splits':>6} {'packed ms':>10} "
          f"{'bf16 ms':>9} {'speedup':>8} {'packed GB/s':>11}" + ("  sdpa ms" if args.sdpa else ""))
    for batch in _parse_ints(args.batches):
        for context in _parse_ints(args.contexts):
            bf16_gib = batch * context * args.kv_heads * 4 * args.head_size / 2 ** 30
            if bf16_gib > args.max_gib:
                print(f"{'(skip)':10} {batch:>5} {context:>7}  bf16 KV {bf16_gib:.0f} GiB > "
                      f"--max-gib")
                continue
            base = bench_one("bf16", batch, context, args, device)
            sdpa = bench_sdpa(batch, context, args, device) if args.sdpa else None
            for preset in presets:
                r = bench_one(preset, batch, context, args, device)
                ratio = base["ms"] / r["ms"]
                rows.append({"preset": preset, "batch": batch, "context": context,
                             "splits": r["splits"], "ms": r["ms"], "bf16_ms": base["ms"],
                             "speedup_vs_bf16": ratio, "gbps": r["gbps"],
                             "bf16_gbps": base["gbps"], "sdpa_ms": sdpa})
                print(f"{preset:10} {batch:>5} {context:>7} {r['splits']:>6} {r['ms']:>10.4f} "
                      f"{base['ms']:>9.4f} {ratio:>7.2f}x {r['gbps']:>11.0f}"
                      + (f"  {sdpa:.4f}" if sdpa is not None else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in
                                                             vars(args).items()},
                                    "rows": rows, "seconds": round(time.time() - t0, 1)},
                                   indent=1))
    geo = math.exp(sum(math.log(r["speedup_vs_bf16"]) for r in rows) / max(1, len(rows)))
    print(f"geometric-mean speedup vs bf16 paged decode: {geo:.2f}x   ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
