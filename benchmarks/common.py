"""Shared pieces of the benchmark commands: engines, the fixed essay split, JSON output."""

import gc
import json
import platform
import time
from pathlib import Path

from vllm_kvq.assets import essays_text, smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"


def make_llm(backend: str, kvq: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(model=smollm2_path(), attention_backend=backend, max_model_len=4096,
                enforce_eager=True, seed=0, kv_cache_memory_bytes=256 << 20)
    args.update(kwargs)
    if kvq is not None:
        args["additional_config"] = {"kvq": kvq}
    return LLM(**args)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def kv_capacity_tokens(llm) -> int:
    """KV tokens as vLLM reports them ("KV cache size: N tokens"): blocks x block size."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def essay_token_windows(tokenizer, num_windows: int, window: int) -> list[list[int]]:
    """The fixed evaluation split: consecutive ``window``-token slices of all essays (file-name
    order), taken from the END of the corpus backwards so they never overlap the needle-test
    haystack, which is built from the start."""
    ids = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    out = []
    for i in range(num_windows):
        stop = len(ids) - i * window
        out.append(ids[stop - window:stop])
    return out


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, machine=platform.machine(), processor=platform.processor() or "cpu",
                   time=time.strftime("%Y-%m-%d %H:%M"))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
