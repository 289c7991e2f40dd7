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
            assert r["tensor_core"], f"{r['name']} {r['arch']}: no tensor-core instructions"
        if "bytes_model" in r:
            assert r["bytes_model"]["4096"]["per_token_vs_slot"] <= 1.15, r["bytes_model"]
    assert summary["failed"] == 0 and summary["with_spills"] == 0
    assert proc.returncode == 0, proc.stdout[-3000:]
