"""Two versions of the CPU kernel source, one layer's step each, in alternating processes.

A change to ``vllm_kvq/cpu_kernel/csrc/kvq_cpu.cpp`` that saves 5-10% is below what a single
run on a shared machine resolves (its CPU_ATTN baseline alone moves by more between runs).
This builds each source into its own cached module (``cpu_kernel.build``, keyed by the
source's hash), then runs rounds of fresh processes A, B, A, B, ...: each process times the
attention call and the whole step (store + attention) of one layer, best of 9 x 10 calls
(CPU time), so drift on the machine hits both versions alike. Reported: the median per
version and B / A per round (< 1: B faster) with its range.

    git show HEAD~1:vllm_kvq/cpu_kernel/csrc/kvq_cpu.cpp > /tmp/before.cpp
    python benchmarks/kernel_ab.py /tmp/before.cpp vllm_kvq/cpu_kernel/csrc/kvq_cpu.cpp
    python benchmarks/kernel_ab.py A.cpp B.cpp --decode 2048 --batch 8   # a decode step
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from common import print_table, write_json


def time_one(args) -> dict:
    """In a child process: build args.source, time one layer's attention and step."""
    import time

    import torch

    from vllm_kvq.cpu_kernel import build

    build.SOURCE = Path(args.sources[0]).resolve()
    reason = build.load()
    if reason is not None:
        raise SystemExit(f"{args.sources[0]} did not build: {reason}")
    from cpu_decode import KVQLayer
    from vllm_kvq.cpu_kernel import ops

    torch.set_num_threads(args.threads)
    prompt = args.decode is None
    layer = KVQLayer(args.preset, args.batch, 0 if prompt else args.decode, 3, 3, 64,
                     16 if prompt else 128, ops, new=args.prefill if prompt else 1,
                     window=args.window if prompt else 0)
    layer.step()

    def attend():
        ops.attend_groups(layer.q, layer.k, layer.v, layer.cache, layer.table, layer.lens,
                          layer.starts, layer.groups, layer.scale, layer.out,
                          packed_limits=layer.limits if prompt else None)

    def best(f, calls=10) -> float:
        times = []
        for _ in range(9):
            t0 = time.process_time()
            for _ in range(calls):
                f()
            times.append((time.process_time() - t0) / calls * 1e3)
        return min(times)

    return {"attend_ms": best(attend), "step_ms": best(layer.step)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs=2, metavar="SOURCE.cpp", help="version A, version B")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="k4v3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--window", type=int, default=16, help="the prompt's exact window")
    parser.add_argument("--decode", type=int, metavar="CONTEXT",
                        help="time a decode step after CONTEXT tokens instead of a prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="kernel_ab")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(time_one(args)))
        return {}
    for source in args.sources:
        if not Path(source).is_file():
            parser.error(f"{source} is not a file; give two kernel sources (.cpp)")
    shape_args = ["--preset", args.preset, "--batch", str(args.batch), "--prefill",
                  str(args.prefill), "--window", str(args.window), "--threads",
                  str(args.threads)] + ([] if args.decode is None else ["--decode",
                                                                          str(args.decode)])
    runs = {"A": [], "B": []}
    for _ in tqdm(range(args.rounds), desc="rounds (A then B)"):
        for name, source in zip("AB", args.sources):  # a child times its first source
            out = subprocess.run([sys.executable, __file__, source, source, *shape_args,
                                  "--child"], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for key in ("attend_ms", "step_ms"):
        ratios = [b[key] / a[key] for a, b in zip(runs["A"], runs["B"])]
        rows.append({"time": key, "A": statistics.median(r[key] for r in runs["A"]),
                     "B": statistics.median(r[key] for r in runs["B"]),
                     "ratio": statistics.median(ratios), "lo": min(ratios),
                     "hi": max(ratios)})
    shape = (f"decode {args.batch} x {args.decode}" if args.decode is not None
             else f"prefill {args.batch} x {args.prefill}, window {args.window}")
    print_table(f"One layer, {args.preset}, {shape}, {args.threads} thread(s): CPU ms, "
                f"median of {args.rounds} rounds (A = {args.sources[0]}, B = {args.sources[1]})",
                rows, [("time", "time", ""), ("A", "A ms", ".2f"), ("B", "B ms", ".2f"),
                       ("ratio", "B / A", ".3f"), ("lo", "min", ".3f"), ("hi", "max", ".3f")])
    result = {"sources": args.sources, "preset": args.preset, "shape": shape,
              "threads": args.threads, "rounds": runs, "summary": rows,
              "command": " ".join(["python benchmarks/kernel_ab.py",
                                   *(sys.argv[1:] if argv is None else argv)])}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
