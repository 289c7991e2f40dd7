"""One command for a GPU machine: are the kernels right there, and how fast is decode?

Needs a CUDA GPU, torch and triton (3.6 or newer) and this checkout -- no vLLM, no install
(``benchmarks/checkout.py`` imports the kernels from the checkout). It

(a) records the environment and the device's achieved copy bandwidth;
(b) checks the kernels against the torch reference on the GPU: the store (every field as
    the reference writes it, up to the rounding slips tests/kernels/field_checks.py allows),
    decode and prefill (per-token packed limits) outputs, for every preset at head sizes 64/128/256 and
    GQA 1/4/8 (``--quick``: five presets at head size 128, GQA 1 and 4), within the kernel
    tests' tolerances (tests/kernels/test_decode.py derives them);
(c) times one decode step of a Llama-3-8B-like layer (8 KV heads, GQA 4, head size 128,
    block 16) at (batch, context) in (1, 32k), (8, 4k), (8, 32k), (32, 32k), (128, 4k), eager
    and replayed from a CUDA graph, against bf16 baselines from the same run: the same
    kernels on raw bf16 pages, torch SDPA on contiguous bf16 K/V, and the bf16 bytes divided
    by the measured copy bandwidth; it reports the achieved bandwidth on the packed bytes;
(d) prints a table and writes ``benchmarks/results/gpu_check.json``.

Without a GPU it runs (b) on the CPU through Triton's interpreter at small shapes (the
quick grid, shorter contexts) and says that nothing was timed; the test suite runs the same
correctness code (tests/kernels/test_gpu_check.py), so it cannot rot.

Usage: ``python benchmarks/gpu_check.py [--quick] [--out PATH]``.
"""

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__":  # the interpreter must be chosen before triton is imported
    if torch.cuda.is_available():
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"

from checkout import ROOT, kernel_module  # noqa: E402  (benchmarks/checkout.py)

RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}  # as tests/kernels/helpers.py
QUICK_PRESETS = ("bf16", "k8v4", "k4v2", "qjl256v4", "kivi2")
TIMED_PRESETS = ("k8v4", "k4v4", "k4v3", "k4v2", "k2v2", "qjl256v4", "kivi2")
SHAPES = ((1, 32768), (8, 4096), (8, 32768), (32, 32768), (128, 4096))
QUICK_SHAPES = ((8, 4096), (8, 32768), (32, 32768))


def presets() -> dict:
    from vllm_kvq.config import PRESETS, WINDOWED_PRESETS

    return {**PRESETS, **WINDOWED_PRESETS}


# ---------------------------------------------------------------------------------------------
# (b) correctness against the torch reference

def store(ops, cache, slots, k, v, kc, vc) -> None:
    """Store K/V as the backend does: per token, then the completed key groups of a grouped
    key format (KIVI), positions starting at a group boundary."""
    ops.store_slots(k, v, cache, slots, kc, vc)
    g = kc.spec.token_group
    if g and k.shape[0] >= g:
        n = k.shape[0] // g * g
        packed = kc.encode_groups(k[:n].unflatten(0, (-1, g))).flatten(0, 1)
        bs = cache.shape[2]
        cache[slots[:n] // bs, :, slots[:n] % bs, :kc.nbytes] = packed


def field_problem(codec, got, want, keys) -> str | None:
    """Why the kernel-written field ``got`` is not the reference's ``want`` beyond the rounding
    slips the kernel tests allow (tests/kernels/field_checks.py derives them), or None."""
    from tests.kernels.field_checks import check_int_field, check_qjl_field
    from vllm_kvq.formats.int_group import IntGroupCodec
    from vllm_kvq.formats.qjl import QJLKeyCodec

    try:
        if isinstance(codec, IntGroupCodec):
            check_int_field(codec, got, want, "")
        elif isinstance(codec, QJLKeyCodec):
            check_qjl_field(codec, got, want, keys, "")
        elif not torch.equal(got, want):  # raw fields, and KIVI keys before their group packs
            return "bytes differ"
    except AssertionError as e:
        return str(e).strip(": ")
    return None


def check_store(api, ref, kc, vc, k, v, slot_bytes: int, device) -> str | None:
    """The store kernel's slots vs the reference's, field by field (``kc``/``vc`` on the CPU;
    copies of them run on ``device``)."""
    from tests.kernels.field_checks import redraw_ambiguous_rows

    redraw_ambiguous_rows(k, kc)  # rows whose stored value is ill-defined
    redraw_ambiguous_rows(v, vc)
    kd, vd = copy.deepcopy(kc).to(device), copy.deepcopy(vc).to(device)
    n, h, _ = k.shape
    slots = torch.randperm(n + 16)[:n].to(device)
    got = torch.randint(0, 256, (-(-(n + 16) // 16), h, 16, slot_bytes), dtype=torch.uint8,
                        device=device)
    want = got.clone()
    api.store_slots(k.to(device), v.to(device), got, slots, kd, vd)
    ref.store_slots(k.to(device), v.to(device), want, slots, kd, vd)
    g = got.permute(0, 2, 1, 3).flatten(0, 1)[slots].flatten(0, 1).cpu()  # [n * h, slot]
    w = want.permute(0, 2, 1, 3).flatten(0, 1)[slots].flatten(0, 1).cpu()
    kb, vb = kc.nbytes, vc.nbytes
    return (field_problem(kc, g[:, :kb], w[:, :kb], k.flatten(0, 1))
            or field_problem(vc, g[:, kb:kb + vb], w[:, kb:kb + vb], None)
            or (None if not g[:, kb + vb:].any() else "padding bytes not zero"))


def check_cell(name: str, head_size: int, gqa: int, device, dtype=torch.bfloat16,
               max_context: int = 300, batch: int = 3) -> dict:
    """Store, decode and prefill of one preset on random inputs vs the torch reference: the
    store's field comparison, and the largest absolute error of the fp32 decode and prefill
    outputs (of unit-scale values)."""
    from vllm_kvq import paged_attention as ref
    from vllm_kvq.exactness import prefill_packed_limits
    from vllm_kvq.formats import build_codecs

    api = kernel_module("api")
    fmt = presets()[name]
    h, bs, d = 2, 32, head_size
    group = fmt.key.token_group or 1
    kc, vc = build_codecs(fmt, d, dtype, random.randrange(1 << 16), random.randrange(64),
                          random.sample(range(16), h))
    store_problem = check_store(api, ref, kc, vc, (torch.randn(37, h, d) * 2).to(dtype),
                                torch.randn(37, h, d).to(dtype), fmt.slot_bytes(d), device)
    kc, vc = kc.to(device), vc.to(device)
    ctx = [random.randint(0, max_context) // group * group for _ in range(batch)]
    qlens = [random.randint(2, 40) for _ in range(batch)]
    per_req = -(-(max(ctx) + max(qlens)) // bs) + 1
    num_blocks = batch * per_req + 2
    table = torch.randperm(num_blocks)[:batch * per_req].view(batch, per_req).int().to(device)
    # Unwritten slots hold junk, as in vLLM: a kernel reading one shows garbage.
    cache = torch.randint(0, 256, (num_blocks, h, bs, fmt.slot_bytes(d)), dtype=torch.uint8,
                          device=device)
    fresh = []
    for b, (c, n) in enumerate(zip(ctx, qlens)):
        pos = torch.arange(c + n, device=device)
        slots = table[b, pos // bs].long() * bs + pos % bs
        k = (torch.randn(c + n, h, d, device=device) * 2).to(dtype)  # peaked attention
        v = torch.randn(c + n, h, d, device=device).to(dtype)
        store(ref, cache, slots[:c], k[:c], v[:c], kc, vc)
        fresh.append((slots[c:], k[c:], v[c:]))
    scale = d ** -0.5
    lens = torch.tensor(ctx, device=device)
    q = torch.randn(batch, h * gqa, d, device=device).to(dtype)
    kd = torch.stack([f[1][0] for f in fresh])
    vd = torch.stack([f[2][0] for f in fresh])
    err = {}
    want = ref.decode_attention(q, kd, vd, cache, table, lens, kc, vc, scale)
    got = api.decode_attention(q, kd, vd, cache, table, lens, kc, vc, scale,
                               num_splits=random.choice([1, 2, 5]))
    err["decode"] = (got - want).abs().max().item()
    # Prefill: each chunk's slots are stored before attention (as the backend does); with
    # per-token packed limits a token reads every earlier key packed and itself exactly.
    # Grouped keys need the exact window for their open group: their chunk reads itself exactly.
    qp = torch.randn(sum(qlens), h * gqa, d, device=device).to(dtype)
    kp = torch.cat([f[1] for f in fresh])
    vp = torch.cat([f[2] for f in fresh])
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    limits = None
    if not fmt.key.token_group:
        for slots, k, v in fresh:
            ref.store_slots(k, v, cache, slots, kc, vc)
        limits = torch.tensor([p for c, n in zip(ctx, qlens)
                               for p in prefill_packed_limits(c, n, c, 0, bs)], device=device)
    want = ref.prefill_attention_varlen(qp, kp, vp, cache, table, qsl, ctx, kc, vc, scale,
                                        packed_limits=limits)
    got = api.prefill_attention_varlen(qp, kp, vp, cache, table, qsl, ctx, kc, vc, scale,
                                       num_splits=random.choice([1, 3]), packed_limits=limits)
    err["prefill"] = (got - want).abs().max().item()
    ok = store_problem is None and all(math.isfinite(e) and e <= TOL[dtype]
                                       for e in err.values())
    return {"preset": name, "head_size": d, "gqa": gqa, "contexts": ctx, "chunks": qlens,
            "store": store_problem or "ok", **{f"{k}_err": v for k, v in err.items()},
            "ok": ok}


def correctness(cells, device, max_context: int) -> list[dict]:
    rows = []
    for name, d, g in cells:
        row = check_cell(name, d, g, device, max_context=max_context)
        rows.append(row)
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {name:9} D={d:<3} gqa={g}  store "
              f"{row['store']}  decode {row['decode_err']:.1e}  prefill "
              f"{row['prefill_err']:.1e}", flush=True)
    return rows


def correctness_cells(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [(p, 128, g) for p in QUICK_PRESETS for g in (1, 4)]
    return [(p, d, g) for p in presets() for d in (64, 128, 256) for g in (1, 4, 8)]


# ---------------------------------------------------------------------------------------------
# (a) environment and (c) timings (CUDA only)

def environment() -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    """Achieved device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def packed_cache(fmt, kc, vc, batch: int, context: int, h: int, d: int, bs: int):
    """A cache of ``batch`` requests x ``context`` tokens (shuffled blocks) whose slots hold
    valid encodings: 4096 random tokens are stored, then their blocks tiled over the cache."""
    api = kernel_module("api")
    seed_blocks = 4096 // bs
    seed = torch.zeros(seed_blocks, h, bs, fmt.slot_bytes(d), dtype=torch.uint8, device="cuda")
    n = seed_blocks * bs
    k = torch.randn(n, h, d, device="cuda").bfloat16()
    store(api, seed, torch.arange(n, device="cuda"), k, torch.randn_like(k), kc, vc)
    per_req = -(-context // bs)
    cache = seed.repeat(-(-batch * per_req // seed_blocks), 1, 1, 1)[:batch * per_req]
    table = torch.randperm(batch * per_req, device="cuda", dtype=torch.int32)
    return cache, table.view(batch, per_req)


def time_decode(name: str, batch: int, context: int, h=8, gqa=4, d=128, bs=16) -> dict:
    """One layer's decode step: eager and CUDA-graph replay (which must equal eager). Grouped
    keys (KIVI) take the smallest block size their groups divide."""
    from vllm_kvq.formats import build_codecs

    api = kernel_module("api")
    fmt = presets()[name]
    bs = max(bs, fmt.key.token_group)
    kc, vc = build_codecs(fmt, d, torch.bfloat16, 0, 0, list(range(h)))
    kc, vc = kc.to("cuda"), vc.to("cuda")
    cache, table = packed_cache(fmt, kc, vc, batch, context, h, d, bs)
    q = torch.randn(batch, h * gqa, d, device="cuda").bfloat16()
    k = torch.randn(batch, h, d, device="cuda").bfloat16()
    v = torch.randn_like(k)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")  # as the builder
    out = torch.empty(batch, h * gqa, d, device="cuda")

    def step():
        api.decode_attention(q, k, v, cache, table, lens, kc, vc, d ** -0.5, out=out)

    eager = bench_ms(step)
    want = out.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) off the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replay_equal = bool(torch.equal(out, want))
    replay = bench_ms(graph.replay)
    packed_bytes = batch * h * context * fmt.slot_bytes(d)
    return {"preset": name, "batch": batch, "context": context, "eager_ms": eager,
            "graph_ms": replay, "graph_equals_eager": replay_equal,
            "packed_gbps": packed_bytes / (min(eager, replay) * 1e6)}


def time_sdpa(batch: int, context: int, h=8, gqa=4, d=128) -> float:
    """torch SDPA (its fastest available kernel) on contiguous bf16 K/V."""
    import torch.nn.functional as F

    q = torch.randn(batch, h * gqa, 1, d, device="cuda").bfloat16()
    k = torch.randn(batch, h, context, d, device="cuda").bfloat16()
    v = torch.randn_like(k)
    return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def timings(shapes, names, bandwidth: float) -> list[dict]:
    rows = []
    for batch, context in shapes:
        base = time_decode("bf16", batch, context)
        sdpa = time_sdpa(batch, context)
        torch.cuda.empty_cache()  # each shape's caches are freed before the next
        ideal = batch * 8 * context * 4 * 128 / bandwidth * 1e3  # bf16 K+V bytes / bandwidth
        for name in names:
            try:  # a failing row is reported; the others still run
                r = time_decode(name, batch, context)
            except Exception as exc:  # noqa: BLE001
                rows.append({"preset": name, "batch": batch, "context": context,
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(f"  {name:9} b={batch:<4} ctx={context:<6} ERROR {rows[-1]['error']}")
                torch.cuda.empty_cache()
                continue
            best = min(r["eager_ms"], r["graph_ms"])
            r.update(bf16_kernel_ms=min(base["eager_ms"], base["graph_ms"]), sdpa_ms=sdpa,
                     bf16_ideal_ms=ideal)
            r.update(vs_bf16_kernel=r["bf16_kernel_ms"] / best, vs_sdpa=sdpa / best,
                     vs_bf16_ideal=ideal / best)
            rows.append(r)
            torch.cuda.empty_cache()
            print(f"  {name:9} b={batch:<4} ctx={context:<6} eager {r['eager_ms']:.3f} ms  "
                  f"graph {r['graph_ms']:.3f} ms  bf16 kernel {r['bf16_kernel_ms']:.3f}  sdpa "
                  f"{sdpa:.3f}  ideal bf16 {ideal:.3f}  -> {r['vs_bf16_kernel']:.2f}x kernel, "
                  f"{r['vs_sdpa']:.2f}x sdpa, {r['packed_gbps']:.0f} GB/s"
                  + ("" if r["graph_equals_eager"] else "  GRAPH != EAGER"), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small grid (about 3 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    random.seed(0)
    torch.manual_seed(0)
    report = {"command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
              "environment": environment(), "quick": args.quick}
    print(f"gpu_check: {report['environment']}")
    if cuda:
        report["copy_gbps"] = copy_bandwidth() / 1e9
        print(f"(a) device copy bandwidth: {report['copy_gbps']:.0f} GB/s")
    print("(b) kernels vs the torch reference" + ("" if cuda else
          " (no CUDA GPU: on the CPU through Triton's interpreter, small shapes)"))
    cells = correctness_cells(args.quick or not cuda)
    report["correctness"] = correctness(cells, device, 300 if cuda else 80)
    failed = [r for r in report["correctness"] if not r["ok"]]
    if cuda:
        print("(c) decode timings, one layer (8 KV heads, GQA 4, D 128, block 16)")
        report["timings"] = timings(QUICK_SHAPES if args.quick else SHAPES,
                                    ("k4v2",) if args.quick else TIMED_PRESETS,
                                    report["copy_gbps"] * 1e9)
    else:
        print("(c) decode timings: skipped, no CUDA GPU on this machine (nothing was timed).")
        report["timings"] = []
    failed += [r for r in report["timings"] if "error" in r]
    report["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    bad = sum(not r["ok"] for r in report["correctness"])
    print(f"(d) {len(cells) - bad}/{len(cells)} correctness cells within tolerance, "
          f"{len(report['timings'])} timings, {report['seconds']} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
