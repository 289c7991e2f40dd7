"""Calibrate WKVQuant's channel smoothing for a KVQ policy: per layer and KV head, the shift
and scale of keys and of values (``vllm_kvq/smoothing.py``) that minimize the layer's
attention-output error under the policy's formats.

1. Statistics. The model runs on calibration windows of the packaged essays (the middle of
   the corpus: the perplexity benchmark reads its end, the needle haystack its start) and
   every layer's queries, keys and values (after RoPE, as the cache sees them) are kept.
   Per channel: the range [min, max] of the keys and of the values.
2. Candidates, from the statistics: shift 0 or the range's centre (OS+'s shift), and scale
   half-range^alpha for alpha in ``--alphas`` (alpha 0: no scaling; scales normalized to a
   geometric mean of 1 per head, which per-token codes do not see).
3. Refinement by the attention-output loss. For each candidate, the layer's attention with its
   keys (or values) through the layer's format -- past-only, the policy's exact window --
   against exact attention: relative squared error of the output, per KV head (a KV head's
   query heads read only it, so each head picks its own candidate from the same runs). Keys
   are chosen with values exact, values with keys exact; a head keeps no smoothing where the
   chosen pair does not beat none on the calibration windows.

Formats whose keys are raw or KIVI's (per-channel statistics absorb a channel affine) get no
key smoothing; raw values none either.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import torch

from ..config import PRESETS, KVQConfig, model_facts
from ..formats import LayerFormat
from ..sensitivity import fake_quant_attention
from ..smoothing import LayerSmoothing

RAW = PRESETS["bf16"].key
CAPTURE_NAME = "kvq_wkvquant_capture"


@dataclass
class LayerActivations:
    """One layer's queries ``[Hq, T, D]`` and keys and values ``[H, T, D]`` per window."""

    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def capture(model_path: str, windows: list[list[int]]) -> tuple[list[LayerActivations], float]:
    """Every layer's attention inputs on the windows (float32), and the attention scaling."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layers = [LayerActivations() for _ in range(model.config.num_hidden_layers)]
    scalings = set()

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        acts = layers[module.layer_idx]
        acts.q.append(query[0].clone())
        acts.k.append(key[0].clone())
        acts.v.append(value[0].clone())
        scalings.add(float(scaling))
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None

    ALL_ATTENTION_FUNCTIONS.register(CAPTURE_NAME, attention)
    model.config._attn_implementation = CAPTURE_NAME
    for ids in windows:
        model(torch.tensor([ids]), use_cache=False)
    (scaling,) = scalings
    return layers, scaling


@dataclass(frozen=True)
class Candidate:
    """A smoothing of one tensor kind (keys or values) for every KV head of a layer."""

    name: str
    shift: torch.Tensor | None  # [H, D]
    scale: torch.Tensor | None


def candidates(lo: torch.Tensor, hi: torch.Tensor, alphas) -> list[Candidate]:
    """From per-channel ranges ``[H, D]``: no smoothing first, then every (shift, alpha)."""
    centre = (lo + hi) / 2
    out = [Candidate("none", None, None)]
    for shifted in (False, True):
        shift = centre if shifted else None
        half = ((hi - lo) / 2 if shifted else torch.maximum(hi.abs(), lo.abs())).clamp_min(1e-6)
        for alpha in alphas:
            if alpha == 0 and not shifted:
                continue  # that is "none"
            scale = None
            if alpha:
                scale = half ** alpha
                scale = scale / scale.log().mean(-1, keepdim=True).exp()  # geometric mean 1
            out.append(Candidate(f"{'shift, ' if shifted else ''}alpha {alpha:g}", shift, scale))
    return out


def _apply(x: torch.Tensor, c: Candidate) -> torch.Tensor:
    if c.shift is not None:
        x = x - c.shift[:, None]
    return x if c.scale is None else x / c.scale[:, None]


def head_losses(acts: LayerActivations, fmt: LayerFormat, layer: int, window: int, seed: int,
                scaling: float, key: Candidate, value: Candidate) -> torch.Tensor:
    """Relative squared error of the layer's attention output per KV head ``[H]``, summed over
    the windows: keys and values smoothed, stored as ``fmt``, the output un-smoothed."""
    err = ref_norm = 0
    for q, k, v in zip(acts.q, acts.k, acts.v):
        h, gqa = k.shape[0], q.shape[0] // k.shape[0]
        exact = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa > 1).transpose(0, 1)
        qs = q if key.scale is None else q * key.scale.repeat_interleave(gqa, 0)[:, None]
        out = fake_quant_attention(qs, _apply(k, key), _apply(v, value), fmt, layer, window,
                                   seed, scaling)  # [T, Hq, D]
        if value.scale is not None:
            out = out * value.scale.repeat_interleave(gqa, 0)
        if value.shift is not None:
            out = out + value.shift.repeat_interleave(gqa, 0)
        err = err + ((out - exact) ** 2).sum((0, 2)).view(h, gqa).sum(1)
        ref_norm = ref_norm + (exact ** 2).sum((0, 2)).view(h, gqa).sum(1)
    return err / ref_norm


def _pick(losses: list[torch.Tensor]) -> torch.Tensor:
    """Per head, the index of the candidate with the least loss."""
    return torch.stack(losses).argmin(0)


def _rows(chosen: list[Candidate], part: str, identity: float, d: int) -> torch.Tensor | None:
    """One [H, D] tensor from each head's chosen candidate (identity where it has none)."""
    rows = [getattr(c, part) for c in chosen]
    if all(r is None for r in rows):
        return None
    return torch.stack([torch.full((d,), identity) if r is None else r[h]
                        for h, r in enumerate(rows)])


def fit_layer(acts: LayerActivations, formats: tuple[LayerFormat, ...], layer: int,
              window: int, seed: int, scaling: float, alphas) -> tuple[LayerSmoothing, dict]:
    """The layer's smoothing (per KV head) and a record of the losses before and after."""
    k_all, v_all = torch.cat(acts.k, 1), torch.cat(acts.v, 1)
    key_cands = candidates(k_all.amin(1), k_all.amax(1), alphas)
    value_cands = candidates(v_all.amin(1), v_all.amax(1), alphas)
    h, d = k_all.shape[0], k_all.shape[-1]
    none = key_cands[0]
    chosen_k, chosen_v = [none] * h, [none] * h
    before, after = torch.zeros(h), torch.zeros(h)
    for fmt in dict.fromkeys(formats):
        heads = [i for i in range(h) if formats[i] == fmt]
        loss = lambda f, kc, vc: head_losses(acts, f, layer, window, seed, scaling, kc, vc)  # noqa: E731
        if fmt.key != RAW and not fmt.key.token_group:
            keys_only = LayerFormat(fmt.key, RAW)
            picks = _pick([loss(keys_only, c, none) for c in key_cands])
            for i in heads:
                chosen_k[i] = key_cands[picks[i]]
        if fmt.value != RAW:
            values_only = LayerFormat(RAW, fmt.value)
            picks = _pick([loss(values_only, none, c) for c in value_cands])
            for i in heads:
                chosen_v[i] = value_cands[picks[i]]
        base = loss(fmt, none, none)
        ks = Candidate("chosen", _rows(chosen_k, "shift", 0.0, d), _rows(chosen_k, "scale", 1.0, d))
        vs = Candidate("chosen", _rows(chosen_v, "shift", 0.0, d), _rows(chosen_v, "scale", 1.0, d))
        both = loss(fmt, ks, vs)
        for i in heads:
            before[i] = base[i]
            after[i] = min(both[i], base[i])
            if both[i] >= base[i]:  # no better on calibration: this head stays unsmoothed
                chosen_k[i] = chosen_v[i] = none
    smoothing = LayerSmoothing(key_shift=_rows(chosen_k, "shift", 0.0, d),
                               key_scale=_rows(chosen_k, "scale", 1.0, d),
                               value_shift=_rows(chosen_v, "shift", 0.0, d),
                               value_scale=_rows(chosen_v, "scale", 1.0, d))
    record = {"layer": layer, "keys": [c.name for c in chosen_k],
              "values": [c.name for c in chosen_v],
              "loss_before": before.tolist(), "loss_after": after.tolist()}
    return smoothing, record


def fit(model_path: str, settings: dict, windows: list[list[int]], alphas,
        progress: bool = True) -> tuple[dict[int, LayerSmoothing], list[dict]]:
    """Smoothing for every layer of the model under the KVQ ``settings``."""
    from tqdm import tqdm

    cfg = KVQConfig.from_dict(settings)
    layers, scaling = capture(model_path, windows)
    heads = layers[0].k[0].shape[0]
    out, records = {}, []
    for layer, acts in enumerate(tqdm(layers, desc="layers", disable=not progress)):
        smoothing, record = fit_layer(acts, cfg.head_formats(layer, heads), layer, cfg.window,
                                      cfg.seed, scaling, alphas)
        if not smoothing.is_identity():
            out[layer] = smoothing
        records.append(record)
    return out, records


def main(argv=None) -> dict:
    from . import calibration

    parser = argparse.ArgumentParser(
        prog="python -m vllm_kvq.wkvquant smooth",
        description="Calibrate WKVQuant channel smoothing for a KVQ preset or policy and write "
                    "a policy file that carries it.")
    parser.add_argument("--out", required=True, help="policy file to write (JSON)")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--preset", default="k4v3", help="KVQ preset the smoothing is fitted for")
    base.add_argument("--policy", help="a KVQ policy file to add smoothing to (its formats)")
    parser.add_argument("--window", type=int,
                        help="exact recent window to serve with (default: the preset's)")
    calibration.add_arguments(parser, windows=8)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1],
                        help="scale exponents tried (scale = half-range^alpha)")
    parser.add_argument("--seed", type=int,
                        help="KVQ seed (rotations; default: the policy's, else 0)")
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.time()
    model = calibration.model_path(args)
    settings = json.load(open(args.policy))["kvq"] if args.policy else {"preset": args.preset}
    settings = {**settings, **({"seed": args.seed} if args.seed is not None else {}),
                **({"window": args.window} if args.window is not None else {})}
    settings.pop("smoothing", None)
    windows = calibration.windows(args, AutoTokenizer.from_pretrained(model))
    smoothing, records = fit(model, settings, windows, args.alphas)
    cfg = AutoConfig.from_pretrained(model)
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    settings["model"] = model_facts(cfg, cfg.get_text_config(), head_size)
    settings["smoothing"] = {str(i): s.as_settings() for i, s in smoothing.items()}
    KVQConfig.from_dict(settings).validate_model(head_size, cfg.num_hidden_layers,
                                                 num_kv_heads=cfg.num_key_value_heads)
    record = {"command": " ".join(["python -m vllm_kvq.wkvquant smooth",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "calibration": calibration.describe(args), "alphas": args.alphas,
              "layers": records, "seconds": round(time.time() - t0, 1)}
    with open(args.out, "w") as f:
        json.dump({"kvq": settings, "smoothing_fit": record}, f)
    print("layer  attention-output error per KV head, without -> with smoothing")
    for r in records:
        pairs = "  ".join(f"{b:.2e} -> {a:.2e}" for b, a in zip(r["loss_before"],
                                                                  r["loss_after"]))
        print(f"{r['layer']:5d}  {pairs}")
    print(f"{len(smoothing)} of {len(records)} layers smoothed; wrote {args.out} in "
          f"{record['seconds']} s")
    return {"kvq": settings, "smoothing_fit": record}
