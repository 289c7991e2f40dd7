"""Channel smoothing (``vllm_kvq/smoothing.py``): the settings, and the backend serving a
smoothed layer.

The backend is pinned by an equivalence: a layer with smoothing (a, s) must store exactly
the bytes, and give exactly the outputs after un-smoothing, that the same layer without
smoothing gives on the smoothed inputs written out here from the definition
(k~ = (k - a_k) / s_k, v~ = (v - a_v) / s_v, q~ = q * s_k, o = o~ * s_v + a_v), across
formats, the exact window, per-head layers and the three attention paths. A second check
shows that the definition is right: a smoothed exact layer attends like attention over the
original keys and values.
"""

import random

import pytest
import torch

from vllm_kvq.config import KVQConfig, KVQConfigError
from vllm_kvq.window import publish_batch

from .test_backend_conformance import Harness, Request, random_batch
from .test_head_formats import _harness, _junk, _share

pytestmark = pytest.mark.usefixtures("one_thread", "seed")


def _rows(h: int, d: int, scale: bool, spread: float) -> torch.Tensor:
    """Random per-channel vectors: scales exp(U(-spread, spread)), shifts N(0, spread)."""
    if scale:
        return torch.empty(h, d).uniform_(-spread, spread).exp()
    return torch.randn(h, d) * spread


def _smoothing(h: int, d: int, parts=("key_shift", "key_scale", "value_shift", "value_scale"),
               spread: float = 0.7) -> dict:
    return {p: _rows(h, d, p.endswith("scale"), spread).tolist() for p in parts}


# -- settings -------------------------------------------------------------------------------

def test_smoothing_settings_parse_merge_and_fail_closed(tmp_path):
    rows = _smoothing(3, 64)
    cfg = KVQConfig.from_dict({"smoothing": {"0-1": rows, "2": {"key_shift": rows["key_shift"]}}})
    assert sorted(cfg.smoothing) == [0, 1, 2]
    assert torch.equal(cfg.smoothing[1].key_scale, torch.tensor(rows["key_scale"]))
    assert cfg.smoothing[2].value_scale is None
    cfg.validate_model(64, 4, 16, num_kv_heads=3)
    policy = tmp_path / "p.json"
    policy.write_text('{"kvq": {"smoothing": {"3": {"key_scale": [[2.0]]}}}}')
    merged = KVQConfig.from_dict({"policy_file": str(policy), "smoothing": {"0": rows}})
    assert sorted(merged.smoothing) == [0, 3]  # entries merge, as "layers" do
    with pytest.raises(KVQConfigError, match="names layer 4, but the model has layers 0-3"):
        KVQConfig.from_dict({"smoothing": {"4": rows}}).validate_model(64, 4, 16, num_kv_heads=3)
    with pytest.raises(KVQConfigError, match="layer 0: key_shift has shape \\[3, 64\\], but "
                                             "the model needs \\[2, 64\\]"):
        cfg.validate_model(64, 4, 16, num_kv_heads=2)
    with pytest.raises(KVQConfigError, match="model needs \\[3, 128\\]"):
        cfg.validate_model(128, 4, 16, num_kv_heads=3)
    bad_scale = [[1.0, 0.0]]
    for entry, match in [
        ([1.0], "must be an object"),
        ({}, "must be an object"),
        ({"key_bias": [[1.0]]}, "must be an object"),
        ({"key_scale": bad_scale}, r"smoothing\['0'\].key_scale is invalid.*positive finite"),
        ({"key_scale": [[1e-50]]}, "positive finite"),  # 0 in float32
        ({"value_shift": [[float("nan")]]}, r"value_shift is invalid.*finite numbers"),
        ({"value_shift": [[1e39]]}, "finite numbers"),  # inf in float32
        ({"value_shift": [[1.0, 2.0], [1.0]]}, "one row per KV head"),  # ragged
        ({"value_shift": [[True]]}, "one row per KV head"),
        ({"value_shift": []}, "one row per KV head"),
    ]:
        with pytest.raises(KVQConfigError, match=match):
            KVQConfig.from_dict({"smoothing": {"0": entry}})
    with pytest.raises(KVQConfigError, match="smoothing must be an object"):
        KVQConfig.from_dict({"smoothing": [rows]})


# -- the backend ----------------------------------------------------------------------------

def _by_definition(x: torch.Tensor, shift, scale, gqa: int = 1, query=False) -> torch.Tensor:
    """The smoothed input, from the definition (float32, rounded once to the model dtype)."""
    y = x.float()
    if query:
        return (y * scale.repeat_interleave(gqa, 0) if scale is not None else y).to(x.dtype)
    if shift is not None:
        y = y - shift
    if scale is not None:
        y = y / scale
    return y.to(x.dtype)


def _tensors(settings: dict) -> dict:
    return {p: torch.tensor(settings[p]) if p in settings else None
            for p in ("key_shift", "key_scale", "value_shift", "value_scale")}


def _smoothed_request(r: Request, s: dict, gqa: int) -> Request:
    out = Request(r.context, r.query, blocks=list(r.blocks))
    out.k = _by_definition(r.k, s["key_shift"], s["key_scale"])
    out.v = _by_definition(r.v, s["value_shift"], s["value_scale"])
    out.q = _by_definition(r.q, None, s["key_scale"], gqa, query=True)
    return out


def _unsmoothed(out: torch.Tensor, s: dict, gqa: int) -> torch.Tensor:
    y = out.float()
    if s["value_scale"] is not None:
        y = y * s["value_scale"].repeat_interleave(gqa, 0)
    if s["value_shift"] is not None:
        y = y + s["value_shift"].repeat_interleave(gqa, 0)
    return y.to(out.dtype)


def _fresh_prompts(n: int = 3) -> list[tuple[int, int]]:
    """Prompts from position 0 (KIVI packs its key groups from what the window holds, so its
    requests start empty, as in vLLM)."""
    return [(0, random.randrange(40, 130) | 1) for _ in range(n)]


def _run_pair(tmp_path_factory, kvq: dict, settings: dict, shape, max_context=90, steps=3):
    """The smoothed harness on the requests and the plain one on their smoothed images, side
    by side; yields (step, smoothed output, plain output, smoothed cache, plain cache)."""
    gqa = shape[1] // shape[2]
    smoothed = _harness(tmp_path_factory, {**kvq, "smoothing": {"1": settings}}, shape)
    plain = _harness(tmp_path_factory, kvq, shape)
    assert smoothed.impls[1].smoothing is not None and plain.impls[1].smoothing is None
    s = _tensors(settings)
    batch = _fresh_prompts() if "kivi" in kvq["preset"] else random_batch(shape[3], max_context)
    reqs = smoothed.make_requests(batch, spare_blocks=len(batch) + steps)  # blocks for steps
    _share(smoothed, plain)
    content = smoothed.impls[1].token_head_bytes
    cache_a = _junk(smoothed, content)
    cache_b = cache_a.clone()
    smoothed.store_context(1, cache_a, reqs)
    plain.store_context(1, cache_b, [_smoothed_request(r, s, gqa) for r in reqs])
    for step in range(steps):
        publish_batch([f"smoothed-{i}" for i in range(len(reqs))])
        out_a = smoothed.step(1, cache_a, reqs)
        publish_batch([f"plain-{i}" for i in range(len(reqs))])
        out_b = plain.step(1, cache_b, [_smoothed_request(r, s, gqa) for r in reqs])
        yield step, out_a, _unsmoothed(out_b, s, gqa), cache_a, cache_b
        reqs = [smoothed.next_token(r) for r in reqs]
        smoothed.set_block_table(reqs)
        _share(smoothed, plain)
    publish_batch(None)


CASES = [  # settings, (head size, query heads, KV heads, block size), window
    ({"preset": "k4v2"}, (64, 6, 3, 16), 16),
    ({"preset": "k4v3"}, (128, 4, 1, 32), 0),
    ({"preset": "k2v2"}, (256, 4, 2, 16), 8),
    ({"preset": "qjl256v4"}, (64, 8, 2, 16), 0),
    ({"preset": "bf16"}, (64, 4, 2, 16), 0),
    ({"preset": "k4v2", "layers": {"1": {"heads": ["k8v8", "k4v2", "k4v2"]}}}, (64, 3, 3, 16), 16),
    ({"preset": "kivi4"}, (64, 4, 2, 32), 32),  # KIVI: 32-token groups fill blocks
]


@pytest.mark.parametrize("kernels, kvq, shape, window", [
    *(("auto", *c) for c in CASES), *(("torch", *c) for c in CASES[:5]),
    ("triton", *CASES[0]), ("triton", *CASES[3])])
def test_smoothed_layer_is_the_plain_layer_on_smoothed_inputs(tmp_path_factory, monkeypatch,
                                                              kernels, kvq, shape, window):
    monkeypatch.setenv("VLLM_KVQ_KERNELS", kernels)
    kvq = {**kvq, "seed": random.randrange(1 << 20), "window": window,
           "canary": kernels != "triton"}  # the canary's bound vs Triton QJL: test_head_formats
    settings = _smoothing(shape[2], shape[0])
    interpreted = kernels == "triton"
    for step, got, want, cache_a, cache_b in _run_pair(
            tmp_path_factory, kvq, settings, shape, max_context=40 if interpreted else 90,
            steps=2 if interpreted else 3):
        assert torch.equal(cache_a, cache_b), f"step {step}: pages differ"
        assert torch.isfinite(got).all() and torch.equal(got, want), \
            f"step {step}: outputs differ by {(got.float() - want.float()).abs().max():.3g}"


def test_identity_smoothing_stores_the_same_bytes_and_answers(tmp_path_factory):
    d, h = 64, 3
    identity = {"key_shift": torch.zeros(h, d).tolist(), "key_scale": torch.ones(h, d).tolist(),
                "value_shift": torch.zeros(h, d).tolist(),
                "value_scale": torch.ones(h, d).tolist()}
    kvq = {"preset": "k4v3", "seed": random.randrange(1 << 20)}  # its 16-token window
    for step, got, want, cache_a, cache_b in _run_pair(tmp_path_factory, kvq, identity,
                                                       (d, 6, h, 16)):
        assert torch.equal(cache_a, cache_b) and torch.equal(got, want), f"step {step}"


def _exact_attention(h: Harness, r: Request) -> torch.Tensor:
    """Causal attention of the request's queries over its original keys and values, float64."""
    g = h.hq // h.h
    q = r.q.double().transpose(0, 1)
    k = r.k.double().transpose(0, 1).repeat_interleave(g, 0)
    v = r.v.double().transpose(0, 1).repeat_interleave(g, 0)
    scores = q @ k.transpose(1, 2) * h.scale
    pos = torch.arange(r.seq)
    mask = pos[None, :] <= (r.context + torch.arange(r.query))[:, None]
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return (p @ v).transpose(0, 1)


@pytest.mark.parametrize("window", [0, 16])
def test_smoothed_exact_layer_attends_like_the_original(tmp_path_factory, window):
    """bf16 storage with a strong smoothing (shifts of 3, scales up to 7x) against float64
    attention over the unsmoothed inputs. The bound is derived: bf16's unit roundoff 2^-9 on
    q~, k~, v~ and the output, times a factor 4 for the logits' amplification at these
    ranges, as a norm over every output (thousands of elements, so no single draw decides);
    getting the definition wrong (q / s, the shift left in) costs errors of order one."""
    d, hq, h, bs = 64, 6, 3, 16
    settings = _smoothing(h, d, spread=2.0)
    kvq = {"preset": "bf16", "window": window, "smoothing": {"1": settings}}
    harness = _harness(tmp_path_factory, kvq, (d, hq, h, bs))
    reqs = harness.make_requests(random_batch(bs, 90), spare_blocks=12)
    cache = _junk(harness, harness.impls[1].token_head_bytes)
    harness.store_context(1, cache, reqs)
    publish_batch([f"exact-{i}" for i in range(len(reqs))])
    out = harness.step(1, cache, reqs)
    publish_batch(None)
    ref = torch.cat([_exact_attention(harness, r) for r in reqs])
    error = (out.double() - ref).norm() / ref.norm()
    assert error <= 4 * 4 * 2.0 ** -9, f"relative error {error:.3g}"  # 4 roundings x 4


def test_kivi_keys_absorb_a_channel_affine(tmp_path_factory):
    """KIVI quantizes keys per channel over 32-token groups: smoothing keys only (no values)
    changes its codes only where rounding the smoothed key to bf16 crosses a code boundary
    (prompts of 40-130 tokens: rows past the window read their first groups packed).
    Compared with the per-token 4-bit keys of k4v4 under the same smoothing, whose codes do
    change, the outputs move much less; the bound (a tenth of k4v4's shift from its own
    unsmoothed output) is measured: 0.01-0.03 of it over 20 draws."""
    d, hq, h, bs = 64, 4, 2, 32
    settings = _smoothing(h, d, parts=("key_shift", "key_scale"), spread=1.5)
    base = {"window": 32, "seed": random.randrange(1 << 20), "value_bits": 16}
    harnesses = {(preset, smooth): _harness(
        tmp_path_factory, {**base, "preset": preset,
                           **({"smoothing": {"1": settings}} if smooth else {})}, (d, hq, h, bs))
        for preset in ("kivi4", "k4v4") for smooth in (True, False)}
    first = next(iter(harnesses.values()))
    reqs = first.make_requests(_fresh_prompts(), spare_blocks=2)
    outs = {}
    for key, harness in harnesses.items():
        _share(first, harness)
        cache = _junk(harness, harness.impls[1].token_head_bytes)
        harness.store_context(1, cache, reqs)
        publish_batch([f"{key}-{i}" for i in range(len(reqs))])
        outs[key] = harness.step(1, cache, reqs).double()
    publish_batch(None)
    moved = {p: ((outs[p, True] - outs[p, False]).norm() / outs[p, False].norm()).item()
             for p in ("kivi4", "k4v4")}
    assert moved["kivi4"] <= 0.1 * moved["k4v4"], moved
