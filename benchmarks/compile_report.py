"""GPU-readiness report for the KVQ Triton kernels, produced on a machine without a GPU.

Every kernel configuration the backend can launch (each preset x head size 64/128/256 x
block size 16/32/64/128 x GQA ratio 1/3/4/8, for decode and prefill, with and without the exact
recent window -- which only the merge kernel reads, under its ``WINDOW`` constexpr -- mapped to
the distinct constexpr combinations they compile to; the KIVI presets, which need the window,
only with it and only at block sizes their key group divides) is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))``. For each cubin:

- ``cuobjdump -res-usage``: registers, stack, static shared memory, local memory (spills);
  ``ptxas -v`` on the PTX (the bundled ptxas-blackwell, the only one that accepts Triton 3.9's
  PTX 9.4) adds explicit spill-store / spill-load bytes.
- ``cuobjdump -sass``: global-load widths (LDG.E.128 and cp.async LDGSTS.*.128 are 16 bytes)
  and tensor-core instructions (HMMA: mma.sync on sm_80/sm_90; HGMMA: Hopper wgmma).
- The LLVM IR's debug locations attribute every global load to its source line; load lines
  in ``kernels/bits.py`` and ``kernels/formats/`` are tagged ``# stream: bulk`` (codes, sign
  bits, raw halves) or ``# stream: side`` (scales, mins, norms, outliers), so the report
  states the width of every load on the packed stream, not just totals.
- Signatures are not copied: each unit is a launch the ops plan (``kernels.api.plan_*`` on
  tiny inputs shaped as the backend passes them), compiled with its own argument types.
- An occupancy estimate from registers / shared memory / warps per CTA.
- A bytes-read model per decoded token: the distinct 32-byte DRAM sectors the decode kernel
  touches per page of slots, plus per-step overheads, versus the same model for a bf16 paged
  decode (a 4*D-byte slot).

Usage: ``python benchmarks/compile_report.py [--quick] [--jobs N] [--presets a,b]``
(``--presets``: only those presets, e.g. ``kivi2,kivi4``). Writes
``benchmarks/results/compile_report.json``, a condensed markdown table next to it
(``compile_report.md``) and the cubins and PTX under ``build/compile_report/``.
Exit status 1 if any configuration fails to compile or spills.
"""

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real GPUs, never the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, made explicit

from checkout import ROOT, kernel_module  # benchmarks/checkout.py: runs from a bare checkout

RESULTS = ROOT / "benchmarks" / "results" / "compile_report.json"
CUBIN_DIR = ROOT / "build" / "compile_report"

HEAD_SIZES = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)
GQA_RATIOS = (1, 3, 4, 8)
ARCHS = (80, 90)
# Per-SM limits of A100 (sm_80) and H100 (sm_90) for the occupancy estimate.
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
QUICK = [("k4v2", 128, 16, 4), ("qjl256v4", 128, 16, 8), ("kivi2", 128, 32, 4)]

DIV16_INTS = {"sqr_t", "sqr_h", "stride_blk", "stride_head", "sq_t", "sq_h", "sk_t", "sk_h",
              "sv_t", "sv_h", "so_t", "so_h", "sw_slot", "sw_idx", "sw_h"}


def _kernel_fn(kernel: str):
    """The JIT function of a report kernel name (``decode_context`` -> the context kernel)."""
    module, name = {"context": ("context", "paged_context_kernel"),
                    "merge": ("merge", "merge_fresh_kernel"),
                    "store": ("store", "store_kernel")}[kernel.split("_")[-1]]
    return getattr(kernel_module(module), name)


def all_presets() -> dict:
    """Every shipped preset: the plain ones and those that need the exact recent window."""
    from vllm_kvq.config import PRESETS, WINDOWED_PRESETS
    return {**PRESETS, **WINDOWED_PRESETS}


def _launchable(fmt, block_size: int) -> bool:
    """Key groups (KIVI) must divide the block size (a group never spans two blocks)."""
    return block_size % (fmt.key.token_group or 1) == 0


def planned_launches(fmt, d: int, block_size: int, gqa: int, dtype):
    """(report kernel name, Launch) of every launch the backend can make for one layer
    format: the ``plan_*`` twins of the ops on tiny inputs shaped as the backend passes them
    (int32 block tables, lengths and limits), never run. Prefill with per-token packed
    limits (the default, vllm_kvq/exactness.py) and without (prefill_exact); with and
    without the exact window (KIVI layers always have one); for full and sliding-window
    layers (each row's first visible key, ``FIRST_KEYS``)."""
    import torch

    from vllm_kvq.formats import build_codecs

    api = kernel_module("api")
    kc, vc = build_codecs(fmt, d, dtype, 0, 0, [0])
    cache = torch.zeros(2, 1, block_size, fmt.slot_bytes(d), dtype=torch.uint8)
    table = torch.zeros(1, 2, dtype=torch.int32)
    lens = torch.full((1,), block_size, dtype=torch.int32)
    q, kv = torch.zeros(2, gqa, d, dtype=dtype), torch.zeros(2, 1, d, dtype=dtype)
    ring = (torch.zeros(2, 16, 1, d, dtype=dtype), torch.zeros(2, 16, 1, d, dtype=dtype))
    out = [("store", one) for one in
           api.plan_store_slots(kv, kv, cache, torch.zeros(2, dtype=torch.int64), kc, vc)]
    for window in (True,) if fmt.key.token_group else (False, True):
        for sliding in (False, True):
            kw = dict(ring=ring, window_slots=[0], window_exact=[1]) if window else {}
            first = torch.zeros(2, dtype=torch.int32)
            decode, _ = api.plan_decode_attention(
                q[:1], kv[:1], kv[:1], cache, table, lens, kc, vc, 0.125, num_splits=1,
                first_keys=first[:1] if sliding else None, **kw)
            out += [("decode_context", decode[0]), ("decode_merge", decode[1])]
            for limits in (torch.full((2,), block_size, dtype=torch.int32), None):
                prefill, _ = api.plan_prefill_attention_varlen(
                    q, kv, kv, cache, table, [0, 2], lens, kc, vc, 0.125,
                    packed_limits=limits, first_keys=first if sliding else None, **kw)
                out += [("prefill_context", prefill[0]), ("prefill_merge", prefill[1])]
    return out


def enumerate_configs(quick: bool, dtypes=("bf16",), presets=None):
    """Distinct compile units -> the (preset, D, block size, GQA) launches that use them.
    ``presets``: restrict to these preset names (None: all)."""
    import torch

    layout_for_format = kernel_module("layout").layout_for_format

    formats = all_presets()
    unknown = sorted(set(presets or ()) - set(formats))
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(formats)}")
    combos = (QUICK if quick else
              [(p, d, bs, g) for p in formats for d in HEAD_SIZES for bs in BLOCK_SIZES
               for g in GQA_RATIOS])
    combos = [c for c in combos if (presets is None or c[0] in presets)
              and _launchable(formats[c[0]], c[2])]
    units: dict = {}
    for dt in dtypes:
        torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        for preset, d, bs, g in combos:
            fmt = formats[preset]
            layout = layout_for_format(fmt, d, torch_dt)
            for kernel, planned in planned_launches(fmt, d, bs, g, torch_dt):
                ce = planned.constexprs
                key = (kernel, dt, planned.num_warps, planned.num_stages, planned.maxnreg,
                       tuple(sorted(ce.items())))
                label = layout.describe() + (" + row limits" if kernel == "prefill_context"
                                             and ce["ROW_LIMITS"] else "")
                if kernel.endswith("merge"):  # shared by every format with this D / rotation
                    label = (f"D{d} {'rotated' if layout.V_ROT else 'plain'} values"
                             + (" + window" if ce["WINDOW"] else "")
                             + (" + row limits" if ce["ROW_LIMITS"] else ""))
                label += " + sliding window" if ce.get("FIRST_KEYS") else ""
                unit = units.setdefault(key, {
                    "kernel": kernel, "dtype": dt, "num_warps": planned.num_warps,
                    "num_stages": planned.num_stages, "maxnreg": planned.maxnreg,
                    "constexprs": ce, "signature": planned.signature(), "layout": label,
                    "layout_obj": layout, "launches": []})
                where = f"{preset}/D{d}/bs{bs}/g{g}"
                if where not in unit["launches"]:
                    unit["launches"].append(where)
    return list(units.values())


# ---------------------------------------------------------------------------------------------
# Machine-code analysis

def _nvidia_bin(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run(cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def res_usage(cubin: Path) -> dict:
    out = _run([_nvidia_bin("cuobjdump"), "-res-usage", str(cubin)])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return dict(zip(("reg", "stack", "shared_static", "local"), map(int, m.groups())))


def ptxas_spills(ptx_path: Path, arch: int) -> dict | None:
    """Spill bytes from ptxas -v (None if no bundled ptxas accepts this PTX)."""
    suffix = "a" if arch == 90 else ""
    # The flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py make_cubin).
    proc = subprocess.run([_nvidia_bin("ptxas-blackwell"), "-v", "--regAllocOptLevel=2",
                           f"--gpu-name=sm_{arch}{suffix}", str(ptx_path), "-o", os.devnull],
                          capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    r = re.search(r"Used (\d+) registers", text)
    if proc.returncode or not m:
        return None
    return {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2)),
            "ptxas_regs": int(r.group(1)) if r else None}


# Main-loop model (issue 13): per SM and clock, sm_80 and sm_90 issue 4 warp instructions (one
# per scheduler) and convert 16 lanes (I2F, I2FP, F2I, F2F, F2FP, FRND, I2I share that pipe).
ISSUE_PER_CLOCK = 4
CONVERSION_LANES_PER_CLOCK = 16
CONVERSIONS = ("I2F", "I2FP", "F2I", "F2F", "F2FP", "FRND", "I2I")
# What a memory-bound loop must consume on an H200 (about 18-20 bytes of HBM per clock per SM):
# the target of the integer and KIVI formats, and of QJL keys.
LOOP_TARGET = 28
QJL_LOOP_TARGET = 20

SASS_LOAD = re.compile(r"\b(LDG(?:\.E)?(?:\.[\w]+)*|LDGSTS(?:\.[\w]+)*)\b")


SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);",
                              re.M)


def main_loop(sass: str) -> dict | None:
    """The widest loop of a kernel's machine code (a context kernel's walk over the context
    tiles): the instructions from the target of the widest backward branch to that branch,
    NOPs excluded, counted per warp and pass, by class. None for a kernel without a loop."""
    code = [(int(a, 16), op, rest) for a, op, rest in SASS_INSTRUCTION.findall(sass)]
    widest = None
    for addr, op, rest in code:
        target = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            span = (int(target.group(1), 16), addr)
            if widest is None or span[1] - span[0] > widest[1] - widest[0]:
                widest = span
    if widest is None:
        return None
    ops = [op.split(".")[0] for addr, op, _ in code
           if widest[0] <= addr <= widest[1] and not op.startswith("NOP")]
    counts = collections.Counter(ops)
    return {"instructions": len(ops),
            "conversions": sum(counts[c] for c in CONVERSIONS),
            "mufu": counts["MUFU"],
            "shared_memory": sum(n for op, n in counts.items()
                                 if op in ("LDS", "STS", "LDSM", "STSM")),
            "tensor_core": sum(n for op, n in counts.items() if op in ("HMMA", "HGMMA")),
            "by_opcode": dict(counts.most_common())}


def loop_throughput(loop: dict, tile_bytes: int, warps: int) -> dict:
    """Packed bytes per clock per SM the loop can consume: every warp of a CTA runs the loop
    once per tile of ``tile_bytes`` packed bytes; at the issue limit (all its instructions)
    and at the conversion-pipe limit (its conversions, 32 lanes each)."""
    issue = tile_bytes / (loop["instructions"] * warps / ISSUE_PER_CLOCK)
    lanes = loop["conversions"] * warps * 32
    conversion = tile_bytes / (lanes / CONVERSION_LANES_PER_CLOCK) if lanes else math.inf
    return {"tile_bytes": tile_bytes, "issue_limit": round(issue, 1),
            "conversion_limit": round(conversion, 1) if lanes else None,
            "bytes_per_clock": round(min(issue, conversion), 1)}


def sass_summary(cubin: Path) -> dict:
    sass = _run([_nvidia_bin("cuobjdump"), "-sass", str(cubin)])
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, re.M)
    loads = collections.Counter()
    for op in ops:
        if op.startswith("LDGSTS") or op.startswith("LDG."):
            if op.startswith("LDGDEPBAR"):
                continue
            width = (16 if op.endswith(".128") else 8 if op.endswith(".64") else
                     2 if re.search(r"\.(U|S)16", op) else 1 if re.search(r"\.(U|S)8", op)
                     else 4)
            loads[width] += 1
    mma = collections.Counter(op.split(".")[0] for op in ops
                              if op.startswith(("HMMA", "HGMMA", "IMMA", "DMMA")))
    return {"global_loads_by_width": {str(k): v for k, v in sorted(loads.items())},
            "tensor_core": dict(mma), "instructions": len(ops), "main_loop": main_loop(sass)}


_DIFILE = r"^!(\d+) = !DIFile\(filename: \"([^\"]+)\"(?:, directory: \"([^\"]*)\")?"


def _debug_files(llir: str):
    """!N -> source file for every debug scope, and !N -> (line, scope) for locations."""
    files = {m.group(1): str(Path(m.group(3) or "") / m.group(2))
             for m in re.finditer(_DIFILE, llir, re.M)}
    scopes = {}
    for m in re.finditer(r"^!(\d+) = (?:distinct )?!(DISubprogram|DILexicalBlock\w*)\((.*)$",
                         llir, re.M):
        f = re.search(r"file: !(\d+)", m.group(3))
        if f:
            scopes[m.group(1)] = files.get(f.group(1))
    locs = {m.group(1): (int(m.group(2)), m.group(3)) for m in
            re.finditer(r"^!(\d+) = !DILocation\(line: (\d+),[^)]*?scope: !(\d+)", llir, re.M)}
    return scopes, locs


def _load_width(text: str) -> int | None:
    m = re.search(r"ld\.global[\w:.]*?\.(?:v(\d+)\.)?b(\d+)", text)
    if m:
        return int(m.group(1) or 1) * int(m.group(2)) // 8
    m = re.search(r"cp\.async\.c[ag]\.shared\.global[^\"]*?,\s*(0x[0-9a-fA-F]+|\d+)\s*[,;\"]", text)
    if m:
        return int(m.group(1), 0)
    m = re.search(r"= load (?:<(\d+) x )?(i8|i16|i32|i64|half|bfloat|float)[^,]*, "
                  r"ptr addrspace\(1\)", text)
    if m:
        bits = {"i8": 8, "i16": 16, "half": 16, "bfloat": 16, "i32": 32, "float": 32, "i64": 64}
        return int(m.group(1) or 1) * bits[m.group(2)] // 8
    return None


def stream_loads(llir: str) -> dict:
    """Global loads of the packed stream by tag and width, from LLVM IR debug locations."""
    scopes, locs = _debug_files(llir)
    tags: dict = {}
    out = {"bulk": collections.Counter(), "wrap": collections.Counter(),
           "side": collections.Counter(), "other": collections.Counter()}
    for line in llir.splitlines():
        if "addrspace(1)" not in line or ("ld.global" not in line and "cp.async" not in line
                                          and "= load " not in line):
            continue
        width = _load_width(line)
        dbg = re.search(r"!dbg !(\d+)", line)
        if width is None or not dbg or dbg.group(1) not in locs:
            continue
        src_line, scope = locs[dbg.group(1)]
        path = scopes.get(scope)
        tag = "other"
        if path:
            if path not in tags:
                full = Path(path)
                if not full.exists():
                    raise FileNotFoundError(f"the LLVM IR's debug locations name {path}, which "
                                            "does not exist: a kernel compiled elsewhere")
                tags[path] = full.read_text().splitlines()
            text = tags[path][src_line - 1] if 0 < src_line <= len(tags[path]) else ""
            m = re.search(r"# stream: (bulk|wrap|side)", text)
            tag = m.group(1) if m else "other"
        out[tag][width] += 1
    return {k: {str(w): n for w, n in sorted(v.items())} for k, v in out.items()}


def occupancy(reg: int, warps: int, smem: int, arch: int) -> dict:
    regs_per_warp = math.ceil(reg * 32 / 256) * 256 if reg else 0
    by_regs = REGS_PER_SM // (regs_per_warp * warps) if regs_per_warp else MAX_CTAS_PER_SM
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM[arch] // (smem + 1024) if smem else MAX_CTAS_PER_SM
    ctas = max(0, min(by_regs, by_warps, by_smem, MAX_CTAS_PER_SM))
    limiter = min((by_regs, "registers"), (by_warps, "warps"), (by_smem, "shared memory"))[1]
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps,
            "occupancy": round(ctas * warps / MAX_WARPS_PER_SM, 3), "limited_by": limiter}


# ---------------------------------------------------------------------------------------------
# Bytes read per decoded token

def slot_ranges(layout) -> list[tuple[int, int]]:
    """Byte ranges of one slot the decode kernel loads: the whole key field (codes, and the
    side information: scales and mins, norm and outliers, or a KIVI group's piece), the
    value field, and the aligned window a misaligned value-code field is read through."""
    r = [(0, layout.KB), (layout.KB, layout.KB + layout.VB)]
    if layout.V_DELTA:
        r.append((layout.V_A, layout.V_A + layout.V_CB + layout.V_CHUNK))
    return r


def bytes_per_token(layout, block_size: int) -> float:
    """DRAM bytes per context token and KV head: distinct 32-byte sectors of one page."""
    sectors = set()
    for t in range(block_size):
        for lo, hi in slot_ranges(layout):
            for b in range(lo, hi):
                sectors.add((t * layout.SB + b) // 32)
    return 32 * len(sectors) / block_size


def decode_bytes_model(layout, gqa: int, context: int, block_size: int, splits: int) -> dict:
    """Bytes moved per decoded token, per KV head of one layer, packed vs bf16 paged decode."""
    d = layout.D
    per_tok = bytes_per_token(layout, block_size)
    qk = layout.key_qdim()
    prepared = layout.K_BITS < 16  # packed keys score a prepared fp32 query
    q_bytes = gqa * (2 * d + (4 * qk if prepared else 0))  # raw + prepared queries
    overhead = (q_bytes + 4 * -(-context // block_size)  # block table
                + 2 * splits * gqa * (d + 2) * 4  # partials written, then read by the merge
                + gqa * d * 4 + 2 * 2 * d  # output, fresh K/V
                + (4 * d * d if layout.V_ROT else 0))  # un-rotation matrix (L2 resident)
    packed = context * per_tok + overhead
    bf16_overhead = gqa * 2 * d + 4 * -(-context // block_size) + 2 * splits * gqa * (d + 2) * 4 \
        + gqa * d * 4 + 2 * 2 * d
    bf16 = context * 4 * d + bf16_overhead
    return {"context": context, "bytes_per_context_token": per_tok, "slot_bytes": layout.SB,
            "per_token_vs_slot": round(per_tok / layout.SB, 4),
            "packed_bytes": packed, "bf16_bytes": bf16, "vs_bf16": round(packed / bf16, 4)}


# ---------------------------------------------------------------------------------------------
# Compilation

def _signature(unit):
    """The unit's kernel, signature (derived from the planned launch's arguments) and the
    divisibility hints the launchers' pointers and strides satisfy."""
    fn = _kernel_fn(unit["kernel"])
    sig = {name: unit["signature"][name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in DIV16_INTS}
    return fn, sig, attrs


def unit_name(unit) -> str:
    ce = unit["constexprs"]
    lay = unit["layout_obj"]
    tag = re.sub(r"[^A-Za-z0-9]+", "_", lay.describe()).strip("_")
    extra = "_".join(f"{k}{ce[k]}" for k in ("MP", "BLOCK_N", "BLOCK_F", "BT") if k in ce)
    window = "_window" if ce.get("WINDOW") else ""
    window += "_limits" if ce.get("ROW_LIMITS") else ""
    window += "_sliding" if ce.get("FIRST_KEYS") else ""
    return f"{unit['kernel']}_{unit['dtype']}_{tag}_{extra}{window}_w{unit['num_warps']}"


def compile_unit(args) -> dict:
    unit, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = unit_name(unit)
    row = {"name": name, "arch": f"sm_{arch}"}
    t0 = time.time()
    try:
        fn, sig, attrs = _signature(unit)
        src = ASTSource(fn, signature=sig, constexprs=unit["constexprs"], attrs=attrs)
        options = {"num_warps": unit["num_warps"], "num_stages": unit["num_stages"]}
        if unit.get("maxnreg"):
            options["maxnreg"] = unit["maxnreg"]
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # reported, and the report fails
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return row
    CUBIN_DIR.mkdir(parents=True, exist_ok=True)
    cubin = CUBIN_DIR / f"{name}.sm_{arch}.cubin"
    ptx = CUBIN_DIR / f"{name}.sm_{arch}.ptx"
    cubin.write_bytes(ck.asm["cubin"])
    ptx.write_text(ck.asm["ptx"])
    row["compile_s"] = round(time.time() - t0, 2)
    row.update(res_usage(cubin))
    row["shared_dynamic"] = int(ck.metadata.shared)
    row["ptxas"] = ptxas_spills(ptx, arch)
    row.update(sass_summary(cubin))
    try:
        row["stream_loads"] = stream_loads(ck.asm["llir"])
    except FileNotFoundError as exc:
        row["error"] = str(exc)
        return row
    row.update(occupancy(row["reg"], unit["num_warps"],
                         row["shared_static"] + row["shared_dynamic"], arch))
    spill = row["local"] + row["stack"]
    if row["ptxas"]:
        spill += row["ptxas"]["spill_stores"] + row["ptxas"]["spill_loads"]
    row["spill_bytes"] = spill
    return row


def bulk_width_ok(unit, row) -> bool | None:
    """Packed-stream bulk loads are 16 bytes wide (or as wide as a field under 16 bytes)."""
    if not unit["kernel"].endswith("context"):
        return None
    lay = unit["layout_obj"]
    narrowest = min(16, lay.K_CB, lay.V_CB if lay.V_BITS >= 16 else lay.V_CHUNK)
    widths = [int(w) for w in row["stream_loads"]["bulk"]]
    return bool(widths) and min(widths) >= narrowest


def compile_fresh(work, jobs: int) -> list:
    """Compile every (unit, arch) in a Triton cache of its own: a cached kernel keeps the
    debug locations of the checkout that first compiled it, and a deleted or moved checkout
    would leave every load untagged (CI, 2026-12-07: all decode loads read as "other")."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="kvq-compile-report-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # the pool's workers inherit it
        try:
            if jobs > 1:
                with ProcessPoolExecutor(max_workers=jobs) as pool:
                    return list(pool.map(compile_unit, work, chunksize=1))
            return [compile_unit(w) for w in work]
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def run_report(quick: bool, jobs: int, dtypes=("bf16",), out_json: Path = RESULTS,
               verbose: bool = True, presets=None) -> dict:
    t0 = time.time()
    units = enumerate_configs(quick, dtypes, presets)
    work = [(u, a) for u in units for a in ARCHS]
    if verbose:
        print(f"compiling {len(units)} distinct kernel configurations x {len(ARCHS)} "
              f"architectures ({sum(len(u['launches']) for u in units)} launch configurations)"
              f" with {jobs} job(s)...", flush=True)
    rows = compile_fresh(work, jobs)
    results = []
    for (unit, arch), row in zip(work, rows):
        entry = {k: v for k, v in unit.items() if k not in ("layout_obj",)}
        entry["launches"] = sorted(set(unit["launches"]))
        entry.update(row)
        if "error" not in row:
            entry["bulk_loads_16B"] = bulk_width_ok(unit, row)
        if unit["kernel"].endswith("context") and row.get("main_loop"):
            lay = unit["layout_obj"]
            tile = unit["constexprs"]["BLOCK_N"] * (lay.KB + lay.VB)
            entry["loop_throughput"] = loop_throughput(row["main_loop"], tile,
                                                       unit["num_warps"])
        if unit["kernel"] == "decode_context" and "error" not in row:
            lay = unit["layout_obj"]
            g = int(unit["launches"][0].split("/g")[-1])
            entry["bytes_model"] = {
                str(ctx): decode_bytes_model(lay, g, ctx, bs, 1 if ctx < 4096 else 4)
                for ctx, bs in ((4096, 16), (32768, 16))}
        results.append(entry)
    failures = [r for r in results if "error" in r]
    spills = [r for r in results if r.get("spill_bytes")]
    narrow = [r for r in results if r.get("bulk_loads_16B") is False]
    far = [r for r in results if "bytes_model" in r and
           r["bytes_model"]["4096"]["per_token_vs_slot"] > 1.15]
    misses = loop_target_misses(results)
    summary = {"configs": len(units), "compiled": len(results) - len(failures),
               "failed": len(failures), "with_spills": len(spills),
               "bulk_not_16B": len(narrow), "bytes_over_15pct": len(far),
               "loop_target_misses": len(misses),
               "seconds": round(time.time() - t0, 1), "quick": quick,
               "presets": sorted(presets) if presets else "all"}
    report = {"summary": summary, "results": results}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1, default=str))
    out_json.with_suffix(".md").write_text(markdown(results, summary))
    if verbose:
        print_tables(results)
        for miss in misses:
            print(f"below the main-loop target: {miss}")
        print(json.dumps(summary))
        print(f"JSON: {out_json}   table: {out_json.with_suffix('.md')}   cubins: {CUBIN_DIR}")
    return report


def loop_target(unit: dict) -> int | None:
    """The bytes per clock a context loop must reach (issue 13): 28 for k4v2, k4v4, k2v2 and
    kivi2, 20 for QJL keys, at head size 128; None for the configurations without one."""
    presets = {where.split("/")[0] for where in unit["launches"]
               if where.split("/")[1] == "D128"}
    if presets & {"k4v2", "k4v4", "k2v2", "kivi2"}:
        return LOOP_TARGET
    if any(p.startswith("qjl") for p in presets):
        return QJL_LOOP_TARGET
    return None


def loop_target_misses(results: list[dict]) -> list[str]:
    """Context loops below their target, as 'name (arch): bytes per clock'."""
    out = []
    for r in results:
        target = loop_target(r) if "loop_throughput" in r else None
        if target is not None and r["loop_throughput"]["bytes_per_clock"] < target:
            out.append(f"{r['name']} ({r['arch']}): {r['loop_throughput']['bytes_per_clock']}")
    return out


def _fmt_loop(r: dict) -> str:
    """'instructions i conversions c: issue / conversion limit B/clk' of a context loop."""
    loop, tp = r.get("main_loop"), r.get("loop_throughput")
    if not loop or not tp:
        return "-"
    conv = "-" if tp["conversion_limit"] is None else f"{tp['conversion_limit']:.1f}"
    return f"{loop['instructions']}i {loop['conversions']}c: {tp['issue_limit']:.1f} / {conv}"


def _fmt_loads(d: dict) -> str:
    return " ".join(f"{n}x{w}B" for w, n in sorted(d.items(), key=lambda x: -int(x[0]))) or "-"


def print_tables(results: list[dict]) -> None:
    by_kernel = collections.defaultdict(list)
    for r in results:
        by_kernel[r["kernel"]].append(r)
    for kernel, rows in by_kernel.items():
        print(f"\n=== {kernel} ===  (reg: registers/thread; spill: local + stack + ptxas "
              f"spill bytes; smem: static + dynamic bytes; occ: resident warps / 64; LDG16: "
              f"16-byte global loads / all global loads in the SASS; bulk/wrap/side: packed-"
              f"stream loads per tile by width; n: launch configurations using it)")
        print(f"{'configuration':52} {'arch':5} {'w':>1} {'reg':>3} {'spill':>5} {'smem':>6} "
              f"{'occ':>4} {'tensor':>9} {'LDG16':>6} {'bulk':>9} {'wrap':>4} {'side':>10} "
              f"{'n':>3}  bytes/token (model/slot, vs bf16)  main loop (instructions, "
              f"conversions: B/clk/SM at the issue / conversion limit)")
        for r in rows:
            ce = r["constexprs"]
            cfg = (r["layout"] + f" M{ce.get('MP', ce.get('BT'))}"
                   + (f" N{ce['BLOCK_N']}" if "BLOCK_N" in ce else ""))
            if "error" in r:
                print(f"{cfg:52} {r['arch']:5} COMPILE ERROR {r['error']}")
                continue
            tc = " ".join(f"{k}:{v}" for k, v in r["tensor_core"].items()) or "-"
            smem = r["shared_static"] + r["shared_dynamic"]
            sl = r["stream_loads"]
            ldg = r["global_loads_by_width"]
            ldg16 = f"{ldg.get('16', 0)}/{sum(ldg.values())}"
            bm = r.get("bytes_model", {}).get("4096")
            bpt = (f"{bm['bytes_per_context_token']:.0f}/{bm['slot_bytes']} "
                   f"({bm['vs_bf16']:.2f}x)" if bm else "")
            print(f"{cfg:52} {r['arch']:5} {r['num_warps']:>1} {r['reg']:>3} "
                  f"{r['spill_bytes']:>5} {smem:>6} {r['occupancy']:>4.2f} {tc:>9} {ldg16:>6} "
                  f"{_fmt_loads(sl['bulk']):>9} {_fmt_loads(sl['wrap']):>4} "
                  f"{_fmt_loads(sl['side']):>10} {len(r['launches']):>3}  {bpt:22} "
                  f"{_fmt_loop(r)}")


def markdown(results: list[dict], summary: dict) -> str:
    """A condensed table (one row per compiled configuration, sm_80 | sm_90 side by side)."""
    pairs = collections.OrderedDict()
    order = ("store", "decode_context", "decode_merge", "prefill_context", "prefill_merge")
    for r in sorted(results, key=lambda r: order.index(r["kernel"])):
        pairs.setdefault((r["kernel"], r["name"]), {})[r["arch"]] = r
    lines = [
        f"Compiled {summary['configs']} distinct kernel configurations ("
        + ("--quick subset" if summary["quick"] else
           ("presets " + ", ".join(summary["presets"]) if summary.get("presets", "all") != "all"
            else "every preset") + " x head size 64/128/256 x "
           "block size 16-128 x GQA 1/3/4/8, decode and prefill, with and without the exact "
           "recent window (KIVI: with it, block sizes >= its group), bf16 models")
        + f") for sm_80 and sm_90: {summary['compiled']} compiled, {summary['failed']} failed, "
        f"{summary['with_spills']} with spills. Registers and occupancy as sm_80 / sm_90; "
        "bulk / wrap / side: packed-stream loads per thread and tile, by width (wrap: the "
        "16-byte chunk of a misaligned value field); bytes/token: modeled DRAM bytes per "
        "context token and KV head / packed slot bytes (and vs a bf16 paged decode); main "
        "loop: SASS instructions (i) and conversions (c) per warp and context tile, and the "
        f"packed bytes per clock per SM the loop can consume at the issue limit "
        f"({ISSUE_PER_CLOCK} warp instructions per clock) / at the conversion limit "
        f"({CONVERSION_LANES_PER_CLOCK} lanes per clock); targets {LOOP_TARGET} (k4v2, k4v4, "
        f"k2v2, kivi2 at head size 128) and {QJL_LOOP_TARGET} (QJL): "
        f"{summary.get('loop_target_misses', '?')} loops below them.",
        "",
        "| kernel | configuration | warps | registers | spills | smem (B) | occupancy "
        "| tensor cores | bulk | wrap | side | bytes/token | main loop sm_80 | main loop sm_90 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, _), by_arch in pairs.items():
        a, b = by_arch.get("sm_80", {}), by_arch.get("sm_90", {})
        if "error" in a or "error" in b or not a or not b:
            lines.append(f"| {kernel} | {a.get('name') or b.get('name')} | | COMPILE ERROR "
                         "| | | | | | | | | | |")
            continue
        ce = a["constexprs"]
        cfg = (a["layout"] + f" M{ce.get('MP', ce.get('BT'))}"
               + (f" N{ce['BLOCK_N']}" if "BLOCK_N" in ce else ""))
        tc = "/".join(" ".join(f"{k}" for k in r["tensor_core"]) or "-" for r in (a, b))
        bm = a.get("bytes_model", {}).get("4096")
        bpt = (f"{bm['bytes_per_context_token']:.0f}/{bm['slot_bytes']} "
               f"({bm['vs_bf16']:.2f}x)" if bm else "")
        sl = a["stream_loads"]
        lines.append(
            f"| {kernel} | {cfg} | {a['num_warps']} | {a['reg']} / {b['reg']} "
            f"| {a['spill_bytes'] + b['spill_bytes']} "
            f"| {a['shared_static'] + a['shared_dynamic']} | {a['occupancy']:.2f} / "
            f"{b['occupancy']:.2f} | {tc} | {_fmt_loads(sl['bulk'])} | {_fmt_loads(sl['wrap'])} "
            f"| {_fmt_loads(sl['side'])} | {bpt} | {_fmt_loop(a)} | {_fmt_loop(b)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="compile a handful of configurations")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtypes", default="bf16", help="comma list of model dtypes: bf16,fp16")
    ap.add_argument("--presets", default=None,
                    help="comma list of presets to compile (default: all, KIVI included)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="the JSON file to write (the table goes beside it as .md)")
    args = ap.parse_args(argv)
    if args.out.is_dir():  # found out after minutes of compiling otherwise
        ap.error(f"--out {args.out} is a directory; allowed is a file path such as "
                 f"{args.out / 'compile_report.json'}")
    presets = set(args.presets.split(",")) if args.presets else None
    report = run_report(args.quick, args.jobs, tuple(args.dtypes.split(",")), args.out,
                        presets=presets)
    s = report["summary"]
    return 0 if not (s["failed"] or s["with_spills"]) else 1


if __name__ == "__main__":
    sys.exit(main())
