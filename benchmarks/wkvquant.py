"""WKVQuant at equal bytes: chunked-prefill perplexity of 4-bit weight checkpoints with KV rows
(bf16, a KVQ preset, the preset with channel smoothing fitted for that checkpoint), beside the
unquantized model (W16) in the same run, and each model's perplexity in torch as the packing
check.

    python -m vllm_kvq.wkvquant weights --method crr --out build/w4/crr \
        --dequantized-out build/w4/crr-dequantized        # likewise rtn, gptq, lwc
    python benchmarks/wkvquant.py --checkpoints rtn=build/w4/rtn crr=build/w4/crr \
        --rows W16/bf16 W16/k4v4 W16/smooth-k4v4 rtn/bf16 rtn/k4v4 crr/bf16 crr/smooth-k4v4

A row is ``<model>/<kv>``: the model is W16 (the bundled SmolLM2) or a checkpoint's name; the
KV row is ``bf16`` (vLLM's CPU_ATTN), a KVQ row of ``common.py`` (a preset or a NAMED row), or
``smooth-<that>``: the row with smoothing fitted on that model's own activations (``python -m
vllm_kvq.wkvquant smooth --model <its dequantized copy>``; for W16 the fit the committed
``examples/policies/smollm2_smooth_*`` files hold), cached under ``build/wkvquant`` by model,
settings, fit arguments and the checkpoint's record).

vLLM runs a checkpoint's packed 4-bit weights where its CPU kernel can (x86 with AVX-512,
4-bit weights with 16-bit activations: ``VLLM_CPU_INT4_W4A8=0`` is set), and otherwise its
dequantized copy (bf16 weights equal to the packed codes times their scales; the column
``weights`` says which ran). ``torch ppl`` is the same model in transformers (float32,
dequantized weights, exact attention) on the same windows: the bf16-KV row must agree with it
within 0.5%, which catches packing and zero-point errors.
"""

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from common import (NAMED, close, essay_token_windows, open_llm, print_table, teacher_forced,
                    write_json)
from vllm_kvq.assets import REPO_ROOT, smollm2_path
from vllm_kvq.validation import cpu_capability

os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")  # W4A16 on AMX hosts, not int8 activations
W16 = "W16"
SMOOTHED = "smooth-"


def packed_weights_run() -> bool:
    """vLLM's 4-bit CPU kernel (CPUWNA16) needs AVX-512 on x86."""
    import platform

    return platform.machine() not in ("x86_64", "AMD64") or "AVX512" in cpu_capability()


def checkpoint_models(path: str) -> dict:
    """A checkpoint's packed and dequantized folders and how it was made."""
    record = json.loads((Path(path) / "wkvquant.json").read_text())
    if not record.get("dequantized"):
        raise SystemExit(f"{path} has no dequantized copy: write it with --dequantized-out")
    return {"packed": str(Path(path).resolve()), "dequantized": record["dequantized"],
            "record": record}


def fitted_smoothing(model: str, kv: str, record: dict | None, fit_args: list[str]) -> str:
    """The policy file of the KVQ row ``kv`` with smoothing fitted on ``model`` (cached: the
    key covers the model, the row's settings, the fit's arguments and how a checkpoint was
    made, so a rewritten checkpoint is fitted again)."""
    settings = dict(NAMED.get(kv, {"preset": kv}))
    key = hashlib.sha256(json.dumps([str(Path(model).resolve()), settings, fit_args, record],
                                    sort_keys=True).encode()).hexdigest()[:12]
    folder = REPO_ROOT / "build" / "wkvquant"
    path = folder / f"smooth_{kv}_{key}.json"
    if not path.exists():
        from vllm_kvq.wkvquant.smoothing_fit import main as smooth

        folder.mkdir(parents=True, exist_ok=True)
        base = folder / f"settings_{kv}_{key}.json"
        base.write_text(json.dumps({"kvq": settings}))
        smooth(["--model", model, "--policy", str(base), "--out", str(path), *fit_args])
    return str(path)


@torch.no_grad()
def torch_perplexity(model_path: str, windows: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids in windows:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        total -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += len(ids) - 1
    return math.exp(total / count)


def vllm_perplexity(model: str, kv: str, windows_of, chunk: int) -> float:
    llm = open_llm(kv, model=model, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    try:
        lps = [lp for _, seq in teacher_forced(llm, windows_of(llm)) for lp in seq]
    finally:
        close(llm)
    return math.exp(-sum(lps) / len(lps))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="NAME=PATH",
                        help="4-bit checkpoints written by python -m vllm_kvq.wkvquant weights")
    parser.add_argument("--rows", nargs="+", required=True, metavar="MODEL/KV")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--smooth-args", nargs="*", default=[],
                        help="extra arguments of the smoothing fit (e.g. --windows 4)")
    parser.add_argument("--out", default="wkvquant")
    args = parser.parse_args(argv)
    checkpoints = {W16: None}
    for spec in args.checkpoints:
        name, _, path = spec.partition("=")
        checkpoints[name] = checkpoint_models(path)
    rows = [r.split("/", 1) for r in args.rows]
    unknown = sorted({m for m, _ in rows} - set(checkpoints))
    if unknown:
        raise SystemExit(f"--rows name {', '.join(unknown)}, not W16 or a --checkpoints name")
    packed = packed_weights_run()
    windows = []

    def windows_of(llm):
        if not windows:
            windows.extend(essay_token_windows(llm.get_tokenizer(), args.windows, args.window))
        return windows

    out_rows, torch_ppl = [], {}
    for model_name, kv in tqdm(rows, desc="rows"):
        ckpt = checkpoints[model_name]
        dequantized = ckpt["dequantized"] if ckpt else smollm2_path()
        served = ckpt["packed"] if ckpt and packed else dequantized
        row = f"{model_name}/{kv}"
        if kv.startswith(SMOOTHED):
            kv = fitted_smoothing(dequantized, kv[len(SMOOTHED):],
                                  ckpt["record"] if ckpt else None, args.smooth_args)
        ppl = vllm_perplexity(served, kv, windows_of, args.chunk)
        if model_name not in torch_ppl:
            torch_ppl[model_name] = torch_perplexity(dequantized, windows)
        out_rows.append({
            "row": row,
            "weights": "packed W4A16" if ckpt and packed else
                       ("dequantized W4" if ckpt else "bf16"),
            "method": ckpt["record"]["method"] if ckpt else None,
            "checkpoint_mib": ckpt["record"]["checkpoint_bytes"] / 2**20 if ckpt else None,
            "ppl": ppl, "torch_ppl": torch_ppl[model_name], "kv": kv})
        w16 = next((r["ppl"] for r in out_rows if r["row"] == f"{W16}/bf16"), None)
        for r in out_rows:
            r["vs_w16_pct"] = 100 * (r["ppl"] / w16 - 1) if w16 else None
        payload = {"command": " ".join(["python benchmarks/wkvquant.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
                   "args": vars(args), "packed_weights": packed,
                   "checkpoints": {k: v["record"] for k, v in checkpoints.items() if v},
                   "rows": out_rows}
        write_json(args.out, payload)  # after every row: a long run keeps what it measured
    print_table(f"chunked-prefill perplexity, {args.windows} x {args.window} tokens, chunks of "
                f"{args.chunk} (W16/bf16 first if asked for)", out_rows,
                [("row", "row", "s"), ("weights", "weights", "s"), ("ppl", "ppl", ".3f"),
                 ("vs_w16_pct", "vs W16 %", "+.2f"), ("torch_ppl", "torch ppl", ".3f")])
    return payload


if __name__ == "__main__":
    main()
