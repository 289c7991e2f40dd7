"""The GPU-readiness report compiles for sm_80 and sm_90 on this CPU-only machine.

Runs ``benchmarks/compile_report.py --quick`` (a handful of configurations, both
architectures) in a subprocess without TRITON_INTERPRET -- the kernels must be compiled for
real GPUs, not interpreted -- and checks its JSON: everything compiled, zero spills (local
memory, stack, ptxas spill bytes), 16-byte loads on the packed bulk stream of the decode
kernels, and a bytes-per-token model within 15% of the packed slot size.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cuda_toolchain_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"Triton's NVIDIA backend is not importable ({exc})"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas", "cuobjdump"):
        if not (bin_dir / tool).exists() and not shutil.which(tool):
            return f"Triton's bundled {tool} is missing ({bin_dir})"
    return None


def test_compile_report_quick(tmp_path):
    reason = _cuda_toolchain_missing()
    if reason:
        pytest.skip(f"cannot compile for CUDA on this machine: {reason}")
    out = tmp_path / "compile_report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--quick",
         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"report wrote no JSON:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    summary = report["summary"]
    failed = [f"{r['name']} {r['arch']}: {r['error']}" for r in report["results"]
              if "error" in r]
    assert not failed, "compilation failed:\n" + "\n".join(failed)
    spilled = [f"{r['name']} {r['arch']}: {r['spill_bytes']} B" for r in report["results"]
               if r["spill_bytes"]]
    assert not spilled, "kernels spill:\n" + "\n".join(spilled)
    assert {r["arch"] for r in report["results"]} == {"sm_80", "sm_90"}
    for r in report["results"]:
        assert r["local"] == 0 and r["stack"] == 0, r["name"]
        assert r["ptxas"] is None or r["ptxas"]["spill_stores"] == 0, r["name"]
        if r["kernel"].endswith("context"):
            assert r["bulk_loads_16B"], f"{r['name']} {r['arch']}: {r['stream_loads']}"
            loop = r["main_loop"]  # the tile loop: loads, tensor-core dots and the softmax
            assert loop["by_opcode"].get("LDG") and loop["tensor_core"] and loop["mufu"], loop
            assert 0 < r["loop_throughput"]["bytes_per_clock"] < 1000, r["loop_throughput"]
            assert r["tensor_core"], f"{r['name']} {r['arch']}: no tensor-core instructions"
        if "bytes_model" in r:
            assert r["bytes_model"]["4096"]["per_token_vs_slot"] <= 1.15, r["bytes_model"]
    assert summary["failed"] == 0 and summary["with_spills"] == 0
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_main_loop_is_the_widest_backward_branch():
    """The model's arithmetic on a hand-written listing: an inner loop inside the outer one,
    NOPs left out, conversions counted by opcode family."""
    saved = os.environ.get("TRITON_INTERPRET")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from compile_report import loop_throughput, main_loop  # (it unsets TRITON_INTERPRET)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved

    sass = "\n".join(f"        /*{a:04x}*/  {op} ;" for a, op in [
        (0x00, "MOV R1, c[0x0][0x28]"), (0x10, "LDG.E.128 R4, desc[UR4][R2.64]"),
        (0x20, "I2FP.F32.U32 R5, R5"), (0x30, "F2FP.BF16.F32.PACK_AB R6, R5, R5"),
        (0x40, "NOP"), (0x50, "@P1 BRA 0x20"), (0x60, "MUFU.EX2 R7, R7"),
        (0x70, "HMMA.16816.F32 R8, R4, R6, R8"), (0x80, "@P0 BRA 0x10"), (0x90, "EXIT")])
    loop = main_loop(sass)
    assert (loop["instructions"], loop["conversions"], loop["mufu"], loop["tensor_core"]) == \
        (7, 2, 1, 1)
    # 4 warps x 7 instructions per 8192-byte tile: 7 clocks at 4 per clock -> 1170 B/clk;
    # 4 warps x 2 conversions x 32 lanes at 16 lanes per clock: 16 clocks -> 512 B/clk.
    tp = loop_throughput(loop, 8192, 4)
    assert (tp["issue_limit"], tp["conversion_limit"], tp["bytes_per_clock"]) == \
        (1170.3, 512.0, 512.0)
    assert main_loop("        /*0000*/  EXIT ;") is None
