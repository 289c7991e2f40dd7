"""benchmarks/gpu_check.py, the one command for a GPU machine, cannot rot: its correctness
part (store fields, decode and prefill against the torch reference) runs here through Triton's
interpreter, as the script itself runs on a machine without a CUDA GPU, and must pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU: the script would time it")
def test_gpu_check_quick_passes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = report["correctness"]
    assert {c["preset"] for c in cells} >= {"bf16", "k4v2", "qjl256v4", "kivi2"}
    assert all(c["ok"] and c["store"] == "ok" for c in cells), cells
    assert report["timings"] == [] and "nothing was timed" in proc.stdout
