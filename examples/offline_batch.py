"""Offline batch inference with the KVQ backend on the bundled SmolLM2-135M model.

Runs the same prompts through KVQ and through vLLM's bf16 CPU backend in one run, and
prints the generations side by side, the bytes KVQ stores per token, and the KV capacity
(in tokens, as vLLM itself reports it) of both at the same KV memory budget.

    python examples/offline_batch.py [--preset k4v3] [--max-tokens 48]
"""

import argparse
import gc
import json

from vllm import LLM, SamplingParams

from vllm_kvq.assets import essays_text, smollm2_path
from vllm_kvq.config import DEFAULT_PRESET, KVQConfig

KV_BUDGET = 256 << 20  # bytes of KV cache for both backends

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "Three tips for staying healthy are",
    # A long prompt, so that generation reads hundreds of packed tokens back.
    essays_text()[:3000] + "\n\nIn one sentence, the essay above argues that",
]


def run(backend: str, preset: str | None, max_tokens: int):
    extra = {"additional_config": {"kvq": {"preset": preset}}} if preset else {}
    llm = LLM(model=smollm2_path(), attention_backend=backend, max_model_len=4096,
              kv_cache_memory_bytes=KV_BUDGET, enforce_eager=True, seed=0, **extra)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens))
    cache = llm.llm_engine.vllm_config.cache_config
    model = llm.llm_engine.vllm_config.model_config
    result = {
        "texts": [o.outputs[0].text for o in outs],
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "capacity": cache.num_gpu_blocks * cache.block_size,
        "head_size": model.get_head_size(),
        "layers": model.hf_text_config.num_hidden_layers,
        "kv_heads": model.get_total_num_kv_heads(),
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    kvq = run("KVQ", args.preset, args.max_tokens)
    bf16 = run("CPU_ATTN", None, args.max_tokens)

    for i, prompt in enumerate(PROMPTS):
        shown = prompt if len(prompt) < 80 else f"[{len(prompt)}-char essay excerpt] ..." \
            + prompt[-50:]
        same = kvq["tokens"][i] == bf16["tokens"][i]
        print(f"\n=== prompt {i}: {shown!r}")
        print(f"  KVQ {args.preset}: {kvq['texts'][i]!r}")
        print(f"  bf16      : {bf16['texts'][i]!r}" + ("   (identical)" if same else ""))

    cfg = KVQConfig.from_dict({"preset": args.preset})
    d, layers, heads = kvq["head_size"], kvq["layers"], kvq["kv_heads"]
    slot = cfg.default.slot_bytes(d)
    print(f"\nKVQ preset {args.preset}: {cfg.default.describe()}")
    print(f"  bytes per token-head: {slot} (bf16: {4 * d}), "
          f"{cfg.default.bits_per_element(d):.2f} bits per element incl. scales and padding")
    print(f"  bytes per token (all {layers} layers, {heads} KV heads): {slot * layers * heads:,} "
          f"(bf16: {4 * d * layers * heads:,})")
    print(f"KV capacity at {KV_BUDGET >> 20} MiB, as reported by vLLM:")
    print(f"  KVQ : {kvq['capacity']:,} tokens")
    print(f"  bf16: {bf16['capacity']:,} tokens")
    print(f"  ratio: {kvq['capacity'] / bf16['capacity']:.2f}x")
    print(json.dumps({"preset": args.preset, "kvq_tokens": kvq["capacity"],
                      "bf16_tokens": bf16["capacity"]}))


if __name__ == "__main__":
    main()
