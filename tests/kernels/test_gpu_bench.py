"""benchmarks/gpu_decode_bench.py runs unchanged everywhere: on a machine without a CUDA GPU
it prints one line saying so and exits 0 (on a GPU it times the kernels; not run in CI)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU: the benchmark would run")
def test_gpu_bench_without_gpu_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decode_bench.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], proc.stdout
