"""Codes at equal bytes: per-group integer codes, one-scale-per-vector Lloyd-Max codes, QJL.

On real K/V captured from SmolLM2-135M (``attention_error.capture``: post-RoPE queries, keys and
values of every layer on an essay window), the last ``queries`` tokens attend to the others
stored in each format, through the formats' torch references. Three tables, each sorted by
bytes so every comparison is at equal (or fewer) bytes:

  keys     key formats, values exact: bytes, RMSE and mean bias of the scaled logits
  values   value formats, keys exact: bytes, relative error of the attention output
  pairs    (key, value) pairs: bytes before / after the 16-byte slot padding, logit RMSE,
           output error (mean over layers, and the worst layer)

QJL appears on its own (m sign bits of a JL sketch plus exact outliers) and as the residual
correction of a scalar code (TurboQuant's "prod" variant): integer codes, then QJL signs of
what they missed, whose unbiased estimate of <q, residual> is added to the scores.

    python benchmarks/codes.py            # 2048-token window, 128 queries
    python benchmarks/codes.py --quick    # 256 tokens, 32 queries
"""

import argparse
import time

import torch

from attention_error import capture
from common import print_table, write_json


def fmt(kind: str, **params):
    """A registered format (every int / Lloyd-Max code rotated, as in the presets)."""
    def make(d, seed, layer, heads):
        from vllm_kvq.formats import storage_format

        p = dict(params, rotate=True) if kind == "int" else params
        return storage_format(kind, **p).codec(d, torch.bfloat16, seed, layer, heads)
    return make


def residual_qjl(bits: int, group: int, sketch: int):
    """Rotated integer keys plus QJL signs of their residual (keys only)."""
    def make(d, seed, layer, heads):
        from vllm_kvq.formats import storage_format

        base = storage_format("int", bits=bits, group_size=group, rotate=True)
        sketch_fmt = storage_format("qjl", sketch_dim=sketch, outliers=0)
        return ResidualQJL(base.codec(d, torch.bfloat16, seed, layer, heads),
                           sketch_fmt.codec(d, torch.bfloat16, seed + 7, layer, heads))
    return make


class ResidualQJL:
    """Scores = <R q, int code> + QJL estimate of <R q, R k - int code>."""

    def __init__(self, base, sketch):
        self.base, self.sketch = base, sketch
        self.nbytes = base.nbytes + sketch.nbytes

    def encode(self, x):
        packed = self.base.encode(x)
        residual = self.base.rotate_in(x) - self.base.decode(packed)
        return torch.cat([packed, self.sketch.encode(residual)], -1)

    def prepare_queries(self, q):
        rq = self.base.prepare_queries(q)
        return rq, self.sketch.prepare_queries(rq)

    def scores(self, prepared, packed):
        n = self.base.nbytes
        return (self.base.scores(prepared[0], packed[..., :n])
                + self.sketch.scores(prepared[1], packed[..., n:]))


EXACT = fmt("raw")
KEYS = [
    ("int2g64", fmt("int", bits=2, group_size=64)), ("int3g64", fmt("int", bits=3, group_size=64)),
    ("QJL m=128 + 4 outliers", fmt("qjl", sketch_dim=128, outliers=4)),
    ("lloyd4", fmt("lloyd", bits=4)), ("int4g64", fmt("int", bits=4, group_size=64)),
    ("int3g64 + QJL m=64 of the residual", residual_qjl(3, 64, 64)),
    ("int2g64 + QJL m=128 of the residual", residual_qjl(2, 64, 128)),
    ("int4g32", fmt("int", bits=4)), ("QJL m=256 + 4 outliers", fmt("qjl", sketch_dim=256, outliers=4)),
]
VALUES = [
    ("lloyd2", fmt("lloyd", bits=2)), ("int2g64", fmt("int", bits=2, group_size=64)),
    ("int2g32", fmt("int", bits=2)), ("lloyd3", fmt("lloyd", bits=3)),
    ("int3g64", fmt("int", bits=3, group_size=64)), ("int3g32", fmt("int", bits=3)),
    ("lloyd4", fmt("lloyd", bits=4)), ("int4g64", fmt("int", bits=4, group_size=64)),
    ("int4g32", fmt("int", bits=4)),
]
PAIRS = [
    ("int2g32 / int2g32 (k2v2)", fmt("int", bits=2), fmt("int", bits=2)),
    ("lloyd2 / lloyd2", fmt("lloyd", bits=2), fmt("lloyd", bits=2)),
    ("int4g32 / int2g32 (k4v2)", fmt("int", bits=4), fmt("int", bits=2)),
    ("int4g64 / int3g64 (k4v3)", fmt("int", bits=4, group_size=64),
     fmt("int", bits=3, group_size=64)),
    ("int3g64 / int4g64 (k3v4)", fmt("int", bits=3, group_size=64),
     fmt("int", bits=4, group_size=64)),
    ("lloyd4 / lloyd3", fmt("lloyd", bits=4), fmt("lloyd", bits=3)),
    ("lloyd4 / lloyd2", fmt("lloyd", bits=4), fmt("lloyd", bits=2)),
    ("int4g32 / int4g32 (k4v4)", fmt("int", bits=4), fmt("int", bits=4)),
    ("lloyd4 / lloyd4", fmt("lloyd", bits=4), fmt("lloyd", bits=4)),
]


def pair_error(make_key, make_value, layers, d: int, queries: int) -> dict:
    from vllm_kvq.formats import SLOT_ALIGN
    from vllm_kvq.paged_attention import group_queries

    rmse, bias, errs = [], [], []
    for layer, (q, k, v) in enumerate(layers):
        t, h, _ = k.shape
        ctx, scale = t - queries, d ** -0.5
        rows = group_queries(q[ctx:], h).unsqueeze(0)  # [1, H, M, D]
        keys, values = (x[:ctx].transpose(0, 1).unsqueeze(0) for x in (k, v))
        exact = (rows @ keys.transpose(-1, -2)) * scale
        out = torch.softmax(exact, -1) @ values
        # keys and values never share random matrices (build_codecs: seeds 2s and 2s + 1)
        kc, vc = make_key(d, 0, layer, list(range(h))), make_value(d, 1, layer, list(range(h)))
        pk, pv = (c.encode(x[:ctx]).transpose(0, 1).unsqueeze(0) for c, x in ((kc, k), (vc, v)))
        est = kc.scores(kc.prepare_queries(rows), pk) * scale
        got = vc.finish_output(torch.softmax(est, -1) @ vc.decode(pv))
        rmse.append((est - exact).pow(2).mean().sqrt().item())
        bias.append((est - exact).mean().item())
        errs.append(((got - out).norm(dim=-1) / out.norm(dim=-1).clamp_min(1e-12)).mean().item())
    n = kc.nbytes + vc.nbytes
    return {"key_bytes": kc.nbytes, "value_bytes": vc.nbytes, "bytes": n,
            "slot_bytes": -(-n // SLOT_ALIGN) * SLOT_ALIGN, "score_rmse": sum(rmse) / len(rmse),
            "score_bias": sum(bias) / len(bias), "output_rel_err": sum(errs) / len(errs),
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
        tables = {
            "keys": [{"row": n, **pair_error(m, EXACT, layers, d, queries)} for n, m in KEYS],
            "values": [{"row": n, **pair_error(EXACT, m, layers, d, queries)} for n, m in VALUES],
            "pairs": [{"row": n, **pair_error(mk, mv, layers, d, queries)}
                      for n, mk, mv in PAIRS]}
    tables["keys"].sort(key=lambda r: (r["key_bytes"], r["score_rmse"]))
    tables["values"].sort(key=lambda r: (r["value_bytes"], r["output_rel_err"]))
    tables["pairs"].sort(key=lambda r: (r["slot_bytes"], r["output_rel_err"]))
    where = f"{len(layers)} layers, head size {d}; {queries} queries over {window - queries} tokens"
    print_table(f"key codes, values exact ({where})", tables["keys"],
                [("row", "keys", ""), ("key_bytes", "bytes", "d"),
                 ("score_rmse", "logit RMSE", ".4f"), ("score_bias", "logit bias", "+.4f")])
    print_table(f"value codes, keys exact ({where})", tables["values"],
                [("row", "values", ""), ("value_bytes", "bytes", "d"),
                 ("output_rel_err", "out err", ".4f"), ("worst_output_rel_err", "worst", ".4f")])
    print_table(f"pairs ({where})", tables["pairs"],
                [("row", "keys / values", ""), ("bytes", "bytes", "d"),
                 ("slot_bytes", "slot", "d"), ("score_rmse", "logit RMSE", ".4f"),
                 ("output_rel_err", "out err", ".4f"), ("worst_output_rel_err", "worst", ".4f")])
    payload = {"command": "python benchmarks/codes.py" + (" --quick" if args.quick else ""),
               "window": window, "queries": queries, "seconds": time.time() - t0, **tables}
    write_json(args.out or ("codes_quick" if args.quick else "codes"), payload)
    return payload


if __name__ == "__main__":
    main()
