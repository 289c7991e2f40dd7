"""Codes at equal bytes: per-group integer codes against one-scale-per-vector Lloyd-Max codes.

On real K/V captured from SmolLM2-135M (``attention_error.capture``: post-RoPE queries, keys and
values of every layer on an essay window), the last ``queries`` tokens attend to the others
stored in each (key format, value format) pair, through the formats' torch references. For
every pair: bytes per token and KV head (before the 16-byte slot padding, and after it), the
RMSE of the scaled logits, and the relative error of the attention output (mean over layers,
and the worst layer). Rows are grouped by slot size, so each comparison is at equal bytes.

    python benchmarks/codes.py            # 2048-token window, 128 queries
    python benchmarks/codes.py --quick    # 256 tokens, 32 queries
"""

import argparse
import time

import torch

from attention_error import capture
from common import print_table, write_json

# (name, key format, value format): storage_format(kind, **params) arguments; every code is
# rotated (the per-head randomized Hadamard of the presets)
ROWS = [
    ("int2g32 / int2g32 (k2v2)", ("int", dict(rotate=True, bits=2)), ("int", dict(rotate=True, bits=2))),
    ("lloyd2 / lloyd2", ("lloyd", dict(bits=2)), ("lloyd", dict(bits=2))),
    ("int2g64 / int2g64", ("int", dict(rotate=True, bits=2, group_size=64)), ("int", dict(rotate=True, bits=2, group_size=64))),
    ("int4g32 / int2g32 (k4v2)", ("int", dict(rotate=True, bits=4)), ("int", dict(rotate=True, bits=2))),
    ("int4g64 / int3g64 (k4v3)", ("int", dict(rotate=True, bits=4, group_size=64)),
     ("int", dict(rotate=True, bits=3, group_size=64))),
    ("int3g64 / int4g64 (k3v4)", ("int", dict(rotate=True, bits=3, group_size=64)),
     ("int", dict(rotate=True, bits=4, group_size=64))),
    ("lloyd4 / lloyd3", ("lloyd", dict(bits=4)), ("lloyd", dict(bits=3))),
    ("int4g64 / lloyd3", ("int", dict(rotate=True, bits=4, group_size=64)), ("lloyd", dict(bits=3))),
    ("lloyd4 / lloyd2", ("lloyd", dict(bits=4)), ("lloyd", dict(bits=2))),
    ("int4g32 / int4g32 (k4v4)", ("int", dict(rotate=True, bits=4)), ("int", dict(rotate=True, bits=4))),
    ("int4g64 / int4g64", ("int", dict(rotate=True, bits=4, group_size=64)), ("int", dict(rotate=True, bits=4, group_size=64))),
    ("lloyd4 / lloyd4", ("lloyd", dict(bits=4)), ("lloyd", dict(bits=4))),
]


def pair_error(key_spec, value_spec, layers, d: int, queries: int) -> dict:
    from vllm_kvq.formats import LayerFormat, build_codecs, storage_format
    from vllm_kvq.paged_attention import group_queries

    fmt = LayerFormat(storage_format(key_spec[0], **key_spec[1]),
                      storage_format(value_spec[0], **value_spec[1]))
    rmse, errs = [], []
    for layer, (q, k, v) in enumerate(layers):
        t, h, _ = k.shape
        ctx, scale = t - queries, d ** -0.5
        rows = group_queries(q[ctx:], h).unsqueeze(0)  # [1, H, M, D]
        keys, values = (x[:ctx].transpose(0, 1).unsqueeze(0) for x in (k, v))
        exact = (rows @ keys.transpose(-1, -2)) * scale
        out = torch.softmax(exact, -1) @ values
        kc, vc = build_codecs(fmt, d, torch.bfloat16, 0, layer, list(range(h)))
        pk, pv = (c.encode(x[:ctx]).transpose(0, 1).unsqueeze(0) for c, x in ((kc, k), (vc, v)))
        est = kc.scores(kc.prepare_queries(rows), pk) * scale
        got = vc.finish_output(torch.softmax(est, -1) @ vc.decode(pv))
        rmse.append((est - exact).pow(2).mean().sqrt().item())
        errs.append(((got - out).norm(dim=-1) / out.norm(dim=-1).clamp_min(1e-12)).mean().item())
    return {"bytes": fmt.key.nbytes(d) + fmt.value.nbytes(d), "slot_bytes": fmt.slot_bytes(d),
            "score_rmse": sum(rmse) / len(rmse), "output_rel_err": sum(errs) / len(errs),
            "worst_output_rel_err": max(errs)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int)
    parser.add_argument("--queries", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    window = args.window or (256 if args.quick else 2048)
    queries = args.queries or (32 if args.quick else 128)
    t0 = time.time()
    with torch.no_grad():
        layers, d = capture(window)
        rows = [{"row": name, **pair_error(k, v, layers, d, queries)} for name, k, v in ROWS]
    rows.sort(key=lambda r: (r["slot_bytes"], r["output_rel_err"]))
    print_table(f"codes at equal bytes ({len(layers)} layers, head size {d}; {queries} queries "
                f"over {window - queries} stored tokens)", rows,
                [("row", "keys / values", ""), ("bytes", "bytes", "d"),
                 ("slot_bytes", "slot", "d"), ("score_rmse", "logit RMSE", ".4f"),
                 ("output_rel_err", "out err", ".4f"), ("worst_output_rel_err", "worst", ".4f")])
    payload = {"command": "python benchmarks/codes.py" + (" --quick" if args.quick else ""),
               "window": window, "queries": queries, "seconds": time.time() - t0, "rows": rows}
    write_json(args.out or ("codes_quick" if args.quick else "codes"), payload)
    return payload


if __name__ == "__main__":
    main()
