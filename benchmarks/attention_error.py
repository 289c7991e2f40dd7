"""Attention-level error on real K/V captured from SmolLM2-135M, per layer and preset.

The bf16 checkpoint runs once in transformers on an essay window; a hook on every attention
module recomputes its post-RoPE queries, keys and values. Then, with no engine, for every
layer and preset the keys/values of the first ``window - queries`` tokens are packed with the
preset's codecs (vllm_kvq.formats.build_codecs) and the last ``queries`` tokens attend to
them through the codecs' own score / decode paths (what vllm_kvq.paged_attention computes):

  score RMSE   root-mean-square error of the scaled logits q.k/sqrt(d) (logit units)
  score bias   mean of (estimated - exact) scaled logits: ~0 for an unbiased estimator
  output err   ||o_q - o|| / ||o|| of the attention output (per query head, averaged)

bf16 is exact by definition (it is what was captured); vLLM's fp8 KV cache is emulated as a
plain float8_e4m3fn cast of K and V (its default, unscaled) as the reference row.

    python benchmarks/attention_error.py          # 2048-token window, 128 queries, all presets
    python benchmarks/attention_error.py --quick  # 256 tokens, 32 queries, 2 presets
"""

import argparse
import time

import torch
from tqdm import tqdm

from common import kvq_settings, print_table, write_json

FULL = ["k8v4", "k4v4", "k4v2", "k2v2", "qjl256v4", "qjl256v2", "qjl128v2"]


def capture(window: int, offset: int = 0):
    """Post-RoPE q ``[T, Hq, D]``, k/v ``[T, H, D]`` (float32) of every layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vllm_kvq.assets import essays_text, smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = tok(essays_text(), add_special_tokens=False)["input_ids"]
    mid = len(ids) // 2 + offset
    ids = torch.tensor([ids[mid:mid + window]])
    cfg = model.config
    hq, h = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    out = {}

    def hook(layer):
        def fn(module, args, kwargs, _result):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            t = x.shape[1]
            q = module.q_proj(x).view(1, t, hq, d).transpose(1, 2)
            k = module.k_proj(x).view(1, t, h, d).transpose(1, 2)
            v = module.v_proj(x).view(1, t, h, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out[layer] = tuple(z[0].transpose(0, 1).float() for z in (q, k, v))
        return fn

    handles = [m.self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for hd in handles:
        hd.remove()
    return [out[i] for i in range(len(out))], d


def layer_error(name: str, layer: int, q, k, v, queries: int) -> dict:
    """q ``[T, Hq, D]``, k/v ``[T, H, D]``: last ``queries`` tokens attend to the rest."""
    from vllm_kvq.config import KVQConfig
    from vllm_kvq.formats import build_codecs
    from vllm_kvq.paged_attention import group_queries

    t, h, d = k.shape
    ctx = t - queries
    scale = d ** -0.5
    q_rows = group_queries(q[ctx:], h).unsqueeze(0)  # [1, H, M, D]
    kc, vc = k[:ctx].transpose(0, 1).unsqueeze(0), v[:ctx].transpose(0, 1).unsqueeze(0)
    exact = (q_rows @ kc.transpose(-1, -2)) * scale
    o_exact = torch.softmax(exact, -1) @ vc
    with torch.no_grad():
        if name == "fp8":
            f8 = torch.float8_e4m3fn
            est = (q_rows @ kc.to(f8).float().transpose(-1, -2)) * scale
            o_q = torch.softmax(est, -1) @ vc.to(f8).float()
        else:
            fmt = KVQConfig.from_dict(kvq_settings(name)).layer_format(layer)
            key_codec, value_codec = build_codecs(fmt, d, torch.bfloat16, 0, layer,
                                                  list(range(h)))
            pk = key_codec.encode(k[:ctx]).transpose(0, 1).unsqueeze(0)  # [1, H, N, C]
            pv = value_codec.encode(v[:ctx]).transpose(0, 1).unsqueeze(0)
            est = key_codec.scores(key_codec.prepare_queries(q_rows), pk) * scale
            o_q = value_codec.finish_output(torch.softmax(est, -1) @ value_codec.decode(pv))
    diff = est - exact
    rel = (o_q - o_exact).norm(dim=-1) / o_exact.norm(dim=-1).clamp_min(1e-12)
    return {"layer": layer, "score_rmse": diff.pow(2).mean().sqrt().item(),
            "score_bias": diff.mean().item(), "score_std": exact.std().item(),
            "output_rel_err": rel.mean().item()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--window", type=int)
    parser.add_argument("--queries", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    presets = args.presets or (["k4v2", "qjl256v4"] if args.quick else FULL)
    window = args.window or (256 if args.quick else 2048)
    queries = args.queries or (32 if args.quick else 128)
    torch.manual_seed(0)
    t0 = time.time()
    layers, d = capture(window)
    rows = []
    for name in tqdm(["fp8"] + presets, desc="presets"):
        per_layer = [layer_error(name, i, *qkv, queries) for i, qkv in enumerate(layers)]
        n = len(per_layer)
        rows.append({"preset": name,
                     "score_rmse": sum(r["score_rmse"] for r in per_layer) / n,
                     "score_bias": sum(r["score_bias"] for r in per_layer) / n,
                     "max_abs_bias": max(abs(r["score_bias"]) for r in per_layer),
                     "output_rel_err": sum(r["output_rel_err"] for r in per_layer) / n,
                     "worst_layer": max(per_layer, key=lambda r: r["output_rel_err"])["layer"],
                     "worst_output_rel_err": max(r["output_rel_err"] for r in per_layer),
                     "per_layer": per_layer})
    print_table(f"attention error on captured K/V ({len(layers)} layers, head size {d}; "
                f"{queries} queries over {window - queries} packed tokens; bf16 = 0 by "
                "definition)", rows,
                [("preset", "preset", ""), ("score_rmse", "score RMSE", ".4f"),
                 ("score_bias", "mean bias", "+.5f"), ("max_abs_bias", "max|bias|", ".4f"),
                 ("output_rel_err", "out err", ".4f"),
                 ("worst_output_rel_err", "worst out", ".4f"), ("worst_layer", "layer", "d")])
    payload = {"command": "python benchmarks/attention_error.py" +
               (" --quick" if args.quick else ""), "args": vars(args), "window": window,
               "queries": queries, "seconds": time.time() - t0, "rows": rows}
    write_json(args.out or ("attention_error_quick" if args.quick else "attention_error"),
               payload)
    return payload


if __name__ == "__main__":
    main()
