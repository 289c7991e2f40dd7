"""Startup accuracy canary: the first real prompt checks every layer's packed path.

A miscompiled kernel, a driver fault or a broken codec corrupts attention silently: the engine
still answers, just wrongly. So on the first step that prefills at least ``MIN_TOKENS`` tokens
of a request, each layer takes that request's real K/V (up to ``MAX_TOKENS`` tokens), stores
them into a private scratch cache through the path that serves (Triton kernels on GPU, the
torch path on CPU) and lets its last ``ROWS`` queries attend to them packed, one decode row
each. Two references, from the same inputs:

- the format's own specification: codecs built afresh from the settings (never the serving
  ones) and the torch reference ops. The serving path must agree within ``SPEC_TOLERANCE`` of
  the output's magnitude (the kernels' own tolerance is ~2% of unit-scale outputs, see
  tests/kernels/test_decode.py; the torch path agrees to ~1e-6). This is what catches a fault.
- exact attention over the unquantized K/V: the format's real error on this model, logged
  per layer (relative RMS). The serving path may not be much further from exact attention
  than the reference itself is (``EXACT_MARGIN`` times, plus ``SPEC_TOLERANCE``): that
  bound scales with the format, where a fixed cap would refuse coarse formats (measured: a
  2-bit-key, 1-bit-value layer of the shipped 5x policy is 102% off exact on a 64-token
  prompt, as its reference is).

A failure raises ``KVQCanaryError`` with one sentence, which stops the engine before it serves
more; ``"canary": false`` turns the check off. KIVI key layers pack their keys in groups when
the window completes them (``group_packing``), not per token, and are not checked here.
"""

import math

import torch
from vllm.logger import init_logger

from . import paged_attention
from .formats import LayerFormat, build_codecs

logger = init_logger(f"vllm.{__name__}")

MIN_TOKENS = 16
MAX_TOKENS = 64
ROWS = 8
SPEC_TOLERANCE = 0.05
EXACT_MARGIN = 2.0


class KVQCanaryError(RuntimeError):
    """The startup check found the packed attention path wrong; one sentence says where."""


def _decode_rows(ops, q, k, v, key_codec, value_codec, slot_bytes, block_size, scale):
    """The last ``ROWS`` tokens as decodes over a scratch cache holding all n tokens."""
    n, h, d = k.shape
    blocks = -(-n // block_size)
    cache = torch.zeros(blocks, h, block_size, slot_bytes, dtype=torch.uint8, device=k.device)
    ops.store_slots(k, v, cache, torch.arange(n, device=k.device), key_codec, value_codec)
    rows = torch.arange(n - min(ROWS, n - 1), n, device=k.device)
    table = torch.arange(blocks, dtype=torch.int32, device=k.device).expand(rows.numel(), -1)
    return ops.decode_attention(q[rows].contiguous(), k[rows].contiguous(),
                                v[rows].contiguous(), cache, table.contiguous(), rows,
                                key_codec, value_codec, scale), rows


def _exact(q, k, v, rows, scale):
    """Float32 causal attention of the rows' queries over the exact K/V."""
    hq, h = q.shape[1], k.shape[1]
    kk = k.float().repeat_interleave(hq // h, 1).transpose(0, 1)  # [Hq, n, D]
    vv = v.float().repeat_interleave(hq // h, 1).transpose(0, 1)
    qq = q[rows].float().transpose(0, 1)  # [Hq, m, D]
    logits = qq @ kk.transpose(-1, -2) * scale
    visible = torch.arange(k.shape[0], device=k.device)[None, :] <= rows[:, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    return (logits.softmax(-1) @ vv).transpose(0, 1)  # [m, Hq, D]


def _relative_rms(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt().clamp_min(1e-6))


def check_layer(layer: int, ops, key_codec, value_codec, fmt: LayerFormat, seed: int,
                global_heads: list[int], q, k, v, scale: float, block_size: int) -> dict:
    """Run the check on one layer's real q ``[n, Hq, D]``, k/v ``[n, H, D]``; returns the
    measured errors, raising ``KVQCanaryError`` when the serving path is wrong."""
    d = k.shape[-1]
    slot_bytes = fmt.slot_bytes(d)
    served, rows = _decode_rows(ops, q, k, v, key_codec, value_codec, slot_bytes, block_size,
                                scale)
    ref_k, ref_v = (c.to(k.device) for c in build_codecs(fmt, d, k.dtype, seed, layer,
                                                          global_heads))
    spec, _ = _decode_rows(paged_attention, q, k, v, ref_k, ref_v, slot_bytes, block_size,
                           scale)
    exact = _exact(q, k, v, rows, scale)
    magnitude = spec.abs().max().clamp_min(1e-6)
    vs_spec = float((served.float() - spec).abs().max() / magnitude)
    vs_exact, spec_vs_exact = (_relative_rms(out, exact) for out in (served.float(), spec))
    if not math.isfinite(vs_spec) or vs_spec > SPEC_TOLERANCE:
        raise KVQCanaryError(
            f"KVQ startup check failed on layer {layer}: its packed attention differs from its "
            f"format's reference by {vs_spec:.3g} of the output's magnitude (allowed "
            f"{SPEC_TOLERANCE}), so this build would serve corrupted attention; check the GPU "
            "driver, Triton and vLLM versions, or set \"canary\": false to serve anyway.")
    allowed = EXACT_MARGIN * spec_vs_exact + SPEC_TOLERANCE
    if not math.isfinite(vs_exact) or vs_exact > allowed:
        raise KVQCanaryError(
            f"KVQ startup check failed on layer {layer}: its packed attention is {vs_exact:.3g} "
            f"off exact attention (relative RMS) where its format's reference is "
            f"{spec_vs_exact:.3g} off (allowed {allowed:.3g}), so this build would serve "
            "corrupted attention; check the GPU driver, Triton and vLLM versions, or set "
            "\"canary\": false to serve anyway.")
    return {"layer": layer, "vs_spec": vs_spec, "vs_exact": vs_exact, "tokens": k.shape[0]}


def worst_of(a: dict, b: dict) -> dict:
    """One layer's result from those of its head groups (per-head formats): the worst."""
    return {**a, "vs_spec": max(a["vs_spec"], b["vs_spec"]),
            "vs_exact": max(a["vs_exact"], b["vs_exact"])}


class CanaryLog:
    """Collects the per-layer results of one process and logs them once, together."""

    def __init__(self):
        self.results: dict[int, dict] = {}

    def add(self, layer: int, result: dict | None, num_layers: int) -> None:
        """``result`` None: the layer is not checked (KIVI keys)."""
        self.results[layer] = result
        if len(self.results) != num_layers:
            return
        rows = [self.results[i] for i in sorted(self.results) if self.results[i]]
        skipped = num_layers - len(rows)
        if not rows:
            logger.info("KVQ canary: no layer checked (KIVI keys are packed in groups).")
            return
        worst = max(rows, key=lambda r: r["vs_spec"])
        logger.info(
            "KVQ canary passed on %d layers%s (%d real prompt tokens each): packed path vs its "
            "format's reference at most %.2g (layer %d); vs exact attention, relative RMS per "
            "layer: %s", len(rows), f" ({skipped} KIVI layers not checked)" if skipped else "",
            rows[0]["tokens"], worst["vs_spec"], worst["layer"],
            " ".join(f"{r['layer']}:{100 * r['vs_exact']:.1f}%" for r in rows))


CANARY_LOG = CanaryLog()
