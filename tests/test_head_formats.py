"""Per-KV-head formats: the page layout (``vllm_kvq/formats/head_layout.py``), the settings,
and the backend serving a layer whose heads store different formats.

The backend check is an equivalence: head h of a per-head layer must store exactly the bytes
and give the outputs that a layer storing head h's format for every head gives for head h
(same seed, layer and global head, same requests, steps, window and junk-filled caches; the
Triton stores are held to their own field specification, see ``_check_triton_slots``). The
uniform layers are checked against exact attention by test_backend_conformance.py, so this
pins the per-head layer to the same specification, head by head.
"""

import random
from dataclasses import replace

import pytest
import torch

from vllm_kvq.config import PRESETS, KVQConfig, KVQConfigError
from vllm_kvq.formats import LayerFormat
from vllm_kvq.formats.head_layout import head_groups, rank_kv_heads, token_head_bytes
from vllm_kvq.window import publish_batch

from .kernels.field_checks import check_field
from .test_backend_conformance import TIGHT, Harness, Layer, random_batch

pytestmark = pytest.mark.usefixtures("one_thread", "seed")

K4V3, K8V8, K4V2, BF16, QJL = (PRESETS[n] for n in ("k4v3", "k8v8", "k4v2", "bf16",
                                                      "qjl256v4"))


# -- layout ---------------------------------------------------------------------------------

def test_token_head_bytes_is_the_largest_rank_mean():
    # head size 64: k4v3 64, k4v2 64, k8v8 144, bf16 256 bytes
    assert token_head_bytes((K4V3,) * 3, 64, 1) == 64  # uniform: the slot, at any TP
    assert token_head_bytes((K4V3,) * 3, 64, 3) == 64
    assert token_head_bytes((K4V3, K4V2), 64, 1) == 64  # same size, other layout
    assert token_head_bytes((K4V3, K8V8, K4V3), 64, 1) == -(-(64 + 144 + 64) // 3)  # 91
    assert token_head_bytes((K4V3, K8V8, K4V3), 64, 3) == 144  # one head per rank: the max
    heads = (K4V3, K8V8, K4V3, BF16)
    assert token_head_bytes(heads, 64, 2) == max((64 + 144) // 2, (64 + 256) // 2)
    assert token_head_bytes((K4V3, K8V8), 64, 4) == 144  # replicated: 2 ranks per head


@pytest.mark.parametrize("tp, total", [(1, 3), (3, 3), (2, 4), (6, 3), (4, 2)])
def test_rank_heads_cover_every_head(tp, total):
    shares = [rank_kv_heads(r, tp, total) for r in range(tp)]
    assert sorted({h for s in shares for h in s}) == list(range(total))
    assert len({len(s) for s in shares}) == 1


def test_head_groups_tile_the_page_without_overlap():
    """Writing a distinct byte through each head's view fills each group's region of every
    block exactly once, in order, and leaves the rest of the page (the tail) untouched."""
    formats = [K4V3, K4V3, K8V8, BF16, BF16, K4V3]
    d, bs, blocks = 64, 16, 3
    groups = head_groups(formats, d)
    assert [(g.start, g.stop) for g in groups] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    c = token_head_bytes(tuple(formats), d, 1)
    cache = torch.zeros(blocks, len(formats), bs, c, dtype=torch.uint8)
    for g in groups:
        view = g.view(cache)
        assert view.shape == (blocks, g.stop - g.start, bs, g.slot_bytes)
        for i in range(g.stop - g.start):
            view[:, i] = g.start + i + 1
    used = sum(f.slot_bytes(d) for f in formats) * bs
    flat = cache.view(blocks, -1)
    expected = torch.cat([torch.full((f.slot_bytes(d) * bs,), h + 1, dtype=torch.uint8)
                          for h, f in enumerate(formats)])
    for b in range(blocks):
        assert torch.equal(flat[b, :used], expected)
        assert not flat[b, used:].any()
    assert all(g.offset * bs % 128 == 0 for g in groups)  # 8-byte slots x 16-token blocks


# -- settings -------------------------------------------------------------------------------

def test_per_head_settings_parse_and_fail_closed():
    cfg = KVQConfig.from_dict({"preset": "k4v3", "layers": {
        "1": {"heads": ["k8v8", {"value_bits": 4}, "bf16"]}, "2-3": "k4v4"},
        "bf16_layers": [3]})
    assert cfg.head_formats(1, 3) == (K8V8, LayerFormat(K4V3.key, replace(K4V3.value, bits=4)),
                                      BF16)
    assert cfg.head_formats(0, 3) == (K4V3,) * 3 and cfg.layer_formats(3) == (BF16,)
    assert not cfg.uniform
    with pytest.raises(ValueError, match="per KV head"):
        cfg.layer_format(1)
    cfg.validate_model(64, 4, 16, num_kv_heads=3)
    with pytest.raises(KVQConfigError, match="lists 3 formats, but the model has 2 KV heads"):
        cfg.validate_model(64, 4, 16, num_kv_heads=2)
    assert "1 layers with per-head formats" in cfg.describe(64, 4, "p.json")
    for bad, match in [
        ({"heads": ["k4v3"], "value_bits": 2}, "alone"),
        ({"heads": []}, "non-empty list"),
        ({"heads": ["k4v3", "nope"]}, r"layers\['0'\].heads\[1\] preset 'nope'"),
        ({"heads": ["k4v3", "kivi2"]}, "not KIVI"),
    ]:
        with pytest.raises(KVQConfigError, match=match):
            KVQConfig.from_dict({"layers": {"0": bad}, "window": 32})


# -- the backend ----------------------------------------------------------------------------

def _harness(tmp_path_factory, kvq, shape):
    """A harness whose layer 1 is set up under its own config now: layers find their engine's
    config by name (one engine per process in vLLM), and several harnesses live side by side
    here."""
    from vllm_kvq import backend

    d, hq, h, bs = shape
    harness = Harness(tmp_path_factory, head_size=d, num_heads=hq, num_kv_heads=h,
                      block_size=bs, kvq=kvq, num_layers=2)
    layer = Layer(1)
    backend._BUILDER_CONFIGS[layer.layer_name] = harness.vllm_config  # as its builder would
    harness.impls[1]._paths(layer, harness.dtype, torch.device("cpu"))
    return harness


def _junk(h: Harness, content: int) -> torch.Tensor:
    return torch.randint(0, 256, (h.num_blocks, h.h, h.bs, content), dtype=torch.uint8)


def _share(src: Harness, dst: Harness) -> None:
    dst.num_blocks, dst.block_table, dst.free_blocks = (src.num_blocks, src.block_table,
                                                        list(src.free_blocks))


def _check_triton_slots(path, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Slots ``[tokens, slot bytes]`` two Triton stores wrote for the same head and tokens.
    Held to the store kernel's own specification (tests/kernels/field_checks.py: rare one-ulp /
    one-level slips where fp32 summation order decides a rounding boundary), not to
    bit-equality: CI once saw one k4v2 head of the per-head layer differ from the uniform
    layer's bytes while every other head matched, which that specification allows."""
    kb, vb = path.key_codec.nbytes, path.value_codec.nbytes
    check_field(path.key_codec, got[:, :kb], want[:, :kb], f"{what}: keys")
    check_field(path.value_codec, got[:, kb:kb + vb], want[:, kb:kb + vb], f"{what}: values")
    assert torch.equal(got[:, kb + vb:], want[:, kb + vb:]), f"{what}: padding"


CASES = [  # heads' formats, (head size, query heads, KV heads, block size), window
    (["k4v3", "k8v8", "k4v3"], (64, 6, 3, 16), 16),  # a format twice, not adjacent
    (["bf16", "k4v2", "k4v2", "qjl256v4"], (128, 4, 4, 32), 0),
    (["k4v2", "k8v8"], (256, 8, 2, 16), 8),
    (["k4v2", "k8v8"], (64, 8, 2, 16), 8),
]


# auto: the CPU kernels; torch: the reference path; triton: the Triton kernels (interpreted)
@pytest.mark.parametrize("kernels, names, shape, window", [
    *(("auto", *case) for case in CASES), *(("torch", *case) for case in CASES),
    ("triton", *CASES[0]), ("triton", *CASES[1])])
def test_each_head_serves_as_its_own_format_would(tmp_path_factory, monkeypatch, kernels,
                                                 names, shape, window):
    monkeypatch.setenv("VLLM_KVQ_KERNELS", kernels)
    seed = random.randrange(1 << 20)
    # The startup canary runs per head group too (on the first step), except under Triton:
    # its 5%-of-the-output bound is tighter than the kernels' 16-bit-operand tolerance for QJL
    # on random data (tests/kernels/test_decode.py), which real keys stay within.
    base = {"preset": "k4v2", "seed": seed, "window": window, "canary": kernels != "triton"}
    mixed = _harness(tmp_path_factory, {**base, "layers": {"1": {"heads": names}}}, shape)
    uniform = {n: _harness(tmp_path_factory, {**base, "preset": n}, shape) for n in set(names)}
    formats = tuple(PRESETS[n] for n in names)
    content = token_head_bytes(formats, shape[0], 1)
    assert mixed.impls[1].token_head_bytes == content
    assert [p.group for p in mixed.impls[1].paths] == head_groups(list(formats), shape[0])
    assert content < max(f.slot_bytes(shape[0]) for f in formats) or len(set(formats)) == 1
    interpreted = kernels == "triton"  # the interpreter is slow: a smaller run
    batch = random_batch(shape[3], 40 if interpreted else 90)
    reqs = mixed.make_requests(batch, spare_blocks=len(batch) + 2)  # a new block each step
    for u in uniform.values():
        _share(mixed, u)
    caches = {"mixed": _junk(mixed, content)}
    caches.update({n: _junk(u, u.slot_bytes(1)) for n, u in uniform.items()})
    groups = head_groups(list(formats), shape[0])
    paths = {p.group.start: p for p in mixed.impls[1].paths}
    gqa = shape[1] // shape[2]
    steps = 2 if interpreted else 4
    for step in range(steps):
        if step == 0:
            for n, u in uniform.items():
                u.store_context(1, caches[n], reqs, calls=1)
            mixed.store_context(1, caches["mixed"], reqs, calls=1)
        # The window bookkeeping is per process, as in vLLM: each harness's requests go by
        # their own names.
        publish_batch([f"mixed-{i}" for i in range(len(reqs))])
        out = mixed.step(1, caches["mixed"], reqs)
        outs = {}
        for n, u in uniform.items():
            publish_batch([f"{n}-{i}" for i in range(len(reqs))])
            outs[n] = u.step(1, caches[n], reqs)
        for g in groups:
            view = g.view(caches["mixed"])
            for i, head in enumerate(range(g.start, g.stop)):
                name = names[head]
                rows = []  # output rows of the requests whose stored bytes are identical
                for r in reqs:
                    slots = torch.tensor([mixed.slot(r, p) for p in range(r.seq)])
                    got = view[slots // shape[3], i, slots % shape[3]]
                    want = caches[name][slots // shape[3], head, slots % shape[3]]
                    what = f"step {step} head {head} ({name}) bytes"
                    if interpreted:
                        _check_triton_slots(paths[g.start], got, want, what)
                    else:
                        assert torch.equal(got, want), what
                    rows.append(torch.full((r.query,), torch.equal(got, want)))
                # Where a Triton store slipped a code (allowed above), the two layers read
                # different values and their outputs may differ by that code's step: attention
                # is compared where both read the same bytes (every request off Triton).
                rows = torch.cat(rows)
                qh = slice(head * gqa, (head + 1) * gqa)
                a, b = out[rows, qh].double(), outs[name][rows, qh].double()
                if a.numel() == 0:
                    continue
                rtol, atol = TIGHT[mixed.dtype]
                excess = ((a - b).abs() - (rtol * b.abs() + atol)).max()
                assert torch.isfinite(a).all() and excess <= 0, \
                    f"step {step} head {head} ({name}): outputs differ by {excess:.3g} over"
        reqs = [mixed.next_token(r) for r in reqs]
        mixed.set_block_table(reqs)
        for u in uniform.values():
            _share(mixed, u)
    publish_batch(None)
