"""The compiled CPU kernels (vllm_kvq/cpu_kernel) against the torch reference.

Stored bytes must be identical (the C++ store runs the reference's arithmetic: the same
Hadamard butterflies in fp32, exact float64 sums for 1-bit centroids, fp16 rounding, ties to
even). Attention reads the same stored bytes; it differs from the reference only by fp32
rounding order and a polynomial exp (relative error < 2e-7). The bound: a score's error is
at most gamma_D * sum_i |q_i k_i| * scale (gamma_D = D eps / (1 - D eps), eps = 2^-24), about
1.5e-4 at D = 256 for unit-normal q, k (sum |q_i k_i| / sqrt(D) ~ 0.64 sqrt(D)); an output
moves by at most twice the score error times max |v| (< 5 for these inputs): 1.5e-3.
Measured errors of that float path are ~1e-6.

On AVX-512 VNNI hosts keys of <= 4 bits are scored with integer dots: the query in three int8
digits per key group (csrc/kvq_cpu.cpp, "integer key dots"), leaving ~2^-24 of the group's
largest query entry per channel: float32's own rounding, within the same bound. Measured
(``python -m tests.test_cpu_kernel 100``: 100 fresh draws of the decode case per format and
head size, 2026-12-06, AMD EPYC Zen 4): at most 8.6e-6 (two digits had reached 1.1e-4).

On AMX hosts prompt chunks' products run in bf16 tiles with the queries and the weights in
bf16 parts: two for bfloat16 K/V (the rest ~2^-16 of each entry), three for float16 (~2^-24).
Measured (30 draws of 16-90-token prompts per format, Intel Xeon with AMX, 2026-12-07): at most
3.8e-5 with two parts (bfloat16), 2.8e-6 with three (float16; the vector path: 4.2e-6). Two
parts are within TOL; they would not be within test_backend_conformance's float16 budget near
zero (2e-5), which is why float16 keeps three.
"""

import os
import random

import pytest
import torch

from tests.kernels.helpers import (fill_context, junk_cache, layer_format,
                                   random_block_tables, sliding_case)
from vllm_kvq import paged_attention as ref
from vllm_kvq.config import PRESETS
from vllm_kvq.cpu_kernel import ops
from vllm_kvq.cpu_kernel.build import load
from vllm_kvq.exactness import prefill_packed_limits
from vllm_kvq.formats import LayerFormat, storage_format

TOL = 1.5e-3
# Everything the CPU kernels read: every preset without QJL keys, and custom layouts with
# 1/3/8-bit codes, small groups, raw fields at odd offsets.
CUSTOM = {
    "k1g8r_v8g16": LayerFormat(storage_format("int", 1, 8, True),
                               storage_format("int", 8, 16, False)),
    "raw_v1g64r": LayerFormat(storage_format("raw"), storage_format("int", 1, 64, True)),
    "k2g16_v4g8r": LayerFormat(storage_format("int", 2, 16, False),
                               storage_format("int", 4, 8, True)),
    "k3g32_v3g16r": LayerFormat(storage_format("int", 3, 32, False),
                                storage_format("int", 3, 16, True)),
    "k8g64r_raw": LayerFormat(storage_format("int", 8, 64, True), storage_format("raw")),
    # unrotated groups of 8: any head size that is a multiple of 8
    "k1g8_v3g8": LayerFormat(storage_format("int", 1, 8, False),
                             storage_format("int", 3, 8, False)),
    "k4g8_v2g8": LayerFormat(storage_format("int", 4, 8, False),
                             storage_format("int", 2, 8, False)),
    # 56-byte slots at head size 64 (8-byte, not 16-byte multiples: the allocator's 3/3 and
    # 4/2-bit candidates in 64-channel groups)
    "k4g64r_v2g64r": LayerFormat(storage_format("int", 4, 64, True),
                                 storage_format("int", 2, 64, True)),
    "k3g64r_v3g64r": LayerFormat(storage_format("int", 3, 64, True),
                                 storage_format("int", 3, 64, True)),
}
FORMATS = [n for n, f in PRESETS.items() if ops.gap(f, 64, torch.bfloat16) is None]
FORMATS += list(CUSTOM)


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = load()
    assert reason is None, reason  # a fresh clone must build it (g++ is on every machine)


def _format(name):
    return CUSTOM[name] if name in CUSTOM else layer_format(name)


def _codecs(name, d, h, dtype):
    from vllm_kvq.formats import build_codecs

    kc, vc = build_codecs(_format(name), d, dtype, random.randrange(1 << 16),
                          random.randrange(64), random.sample(range(64), h))
    return kc, vc


def test_formats_cover_the_presets():
    assert {"bf16", "k8v8", "k8v4", "k4v4", "k4v2", "k4v3", "k3v4", "k2v2"} <= set(FORMATS)
    for name in ("qjl256v4", "qjl128v2"):
        assert "QJL" in ops.gap(PRESETS[name], 64, torch.bfloat16)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_bytes_identical(name, d, dtype):
    h, bs, nblocks = random.choice([1, 2, 3]), random.choice([16, 32]), 6
    kc, vc = _codecs(name, d, h, dtype)
    slot_bytes = _format(name).slot_bytes(d)
    cache = junk_cache(nblocks, h, bs, slot_bytes)
    t = random.randint(1, 40)
    slots = torch.randperm(nblocks * bs)[:t]
    slots[torch.rand(t) < 0.2] = -1  # padding rows
    # keys as vLLM hands them: a strided view into a fused QKV buffer, outliers in a channel
    qkv = torch.randn(t, 3 * h, d) * torch.where(torch.rand(d) < 0.05, 8.0, 1.0)
    k, v = qkv[:, h:2 * h].to(dtype), qkv[:, 2 * h:].to(dtype)
    want, got = cache.clone(), cache.clone()
    ref.store_slots(k, v, want, slots, kc, vc)
    ops.store_slots(k, v, got, slots, kc, vc)
    assert torch.equal(got, want)


def _ring(slots, window, h, d, dtype):
    return (torch.randn(slots, window, h, d).to(dtype), torch.randn(slots, window, h, d).to(dtype))


def decode_errors(name, d):
    """One random decode case (fresh shapes, GQA, lengths, a window half the time): the max
    error against the reference for whole contexts and contexts cut into parts that merge."""
    dtype = random.choice([torch.bfloat16, torch.float16])
    h, g = random.choice([(1, 1), (2, 4), (3, 3), (1, 8)])
    bs, b = random.choice([16, 32]), random.randint(1, 5)
    kc, vc = _codecs(name, d, h, dtype)
    lens = [random.choice([0, 1, 15, 16, 17, random.randint(1, 300)]) for _ in range(b)]
    per_req = max(1, -(-max(lens) // bs))
    cache = junk_cache(b * per_req + 3, h, bs, _format(name).slot_bytes(d))
    table = random_block_tables(b, per_req, cache.shape[0])
    fill_context(cache, table, lens, kc, vc, d, dtype)
    scale = d ** -0.5
    q = torch.randn(b, h * g, d).to(dtype)
    k, v = torch.randn(b, h, d).to(dtype), torch.randn(b, h, d).to(dtype)
    window = {}
    if random.random() < 0.5:
        w = random.choice([4, 16])
        window = dict(ring=_ring(b + 2, w, h, d, dtype),
                      window_slots=torch.randperm(b + 2)[:b].to(torch.int32),
                      window_exact=torch.tensor([random.randint(0, w) for _ in range(b)],
                                                dtype=torch.int32))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    want = ref.decode_attention(q, k, v, cache, table, lens_t, kc, vc, scale, **window)
    errors = []
    for split in (0, 16, 48):  # whole contexts, and contexts cut into parts that merge
        got = ops.decode_attention(q, k, v, cache, table, lens_t, kc, vc, scale,
                                   split_tokens=split, **window)
        errors.append((got - want).abs().max().item() if torch.isfinite(got).all()
                      else float("inf"))
    return errors


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_matches_reference(name, d):
    for split, err in zip((0, 16, 48), decode_errors(name, d)):
        assert err <= TOL, f"split {split}: {err:.2e}"


@pytest.mark.parametrize("name", ["k4v2", "k3g32_v3g16r"])
def test_float32_queries_give_the_same_outputs(name):
    """The kernels read queries in the K/V dtype (the backend's) or in float32; the model
    dtype's values are exact in float32, so both give the very same outputs (decode, whose
    window folds exact keys, and a prompt chunk)."""
    d, h, g, bs, dtype = 64, 2, 3, 16, torch.bfloat16
    kc, vc = _codecs(name, d, h, dtype)
    lens = [random.randint(1, 80) for _ in range(3)]
    cache = junk_cache(3 * 8, h, bs, _format(name).slot_bytes(d))
    table = random_block_tables(3, 8, cache.shape[0])
    fill_context(cache, table, lens, kc, vc, d, dtype)
    q = torch.randn(3, h * g, d).to(dtype)
    k, v = torch.randn(3, h, d).to(dtype), torch.randn(3, h, d).to(dtype)
    window = dict(ring=_ring(3, 4, h, d, dtype), window_slots=torch.arange(3, dtype=torch.int32),
                  window_exact=torch.tensor([0, 2, 4], dtype=torch.int32))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    decode = [ops.decode_attention(x, k, v, cache, table, lens_t, kc, vc, d ** -0.5, **window)
              for x in (q, q.float())]
    assert torch.equal(*decode)
    starts = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    prefill = [ops.prefill_attention_varlen(x, k, v, cache, table, starts, lens_t, kc, vc,
                                            d ** -0.5, **window) for x in (q, q.float())]
    assert torch.equal(*prefill)


# A bfloat16 output is the kernel's float32 result rounded to nearest: half an ulp, at most
# 2^-8 of the value (8 significant bits), on top of TOL.
BF16_ROUNDING = 2.0 ** -8


def _within_bf16(got, want):
    """|got - want| <= TOL before the rounding to bfloat16, half an ulp after it."""
    return ((got.float() - want).abs()
            - (TOL * (1 + BF16_ROUNDING) + BF16_ROUNDING * want.abs())).max().item()


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_head_groups_in_one_call(mode):
    """A layer whose KV heads store different formats (a per-head policy), stored and
    attended in one call each (``KernelGroups``, as the backend runs the CPU kernels): the
    page's bytes equal the reference's stores into each group's region, each group's outputs
    equal the reference's on its own view, written in place into a strided bfloat16 output,
    and a head no group covers keeps whatever its output rows held."""
    from vllm_kvq.formats.head_layout import HeadGroup

    d, g, bs, dtype = random.choice([64, 128]), random.choice([1, 3]), 16, torch.bfloat16
    names, spans, heads = ["k4v3", "k8v4", "k3g32_v3g16r"], [(0, 1), (1, 3), (4, 5)], 5
    codecs = [_codecs(n, d, stop - start, dtype) for n, (start, stop) in zip(names, spans)]
    slots = [_format(n).slot_bytes(d) for n in names]
    offsets = [sum((b - a) * s for (a, b), s in zip(spans[:i], slots[:i]))
               for i in range(len(spans))]
    layout = [HeadGroup(a, b, _format(n), o, s)
              for n, (a, b), o, s in zip(names, spans, offsets, slots)]
    groups = ops.KernelGroups([(a, b, o, s, kc, vc) for (a, b), o, s, (kc, vc)
                               in zip(spans, offsets, slots, codecs)])
    r = random.randint(1, 3)
    ctx = [random.randint(0, 90) for _ in range(r)]
    qlens = [1] * r if mode == "decode" else [random.randint(2, 40) for _ in range(r)]
    per_req = -(-max(c + n for c, n in zip(ctx, qlens)) // bs)
    page_bytes = -(-(offsets[-1] + slots[-1]) // heads)  # bytes per token-head of the page
    cache = junk_cache(r * per_req + 2, heads, bs, page_bytes)
    want_cache = cache.clone()
    table = random_block_tables(r, per_req, cache.shape[0])
    for b, n in enumerate(ctx):  # the context, stored in one call and by the reference
        pos = torch.arange(n)
        slot = table[b, pos // bs].long() * bs + pos % bs
        k, v = torch.randn(n, heads, d).to(dtype), torch.randn(n, heads, d).to(dtype)
        ops.store_groups(k, v, cache, slot, groups)
        for grp, (kc, vc) in zip(layout, codecs):
            ref.store_slots(k[:, grp.heads].contiguous(), v[:, grp.heads].contiguous(),
                            grp.view(want_cache), slot, kc, vc)
    assert torch.equal(cache, want_cache)
    tokens = sum(qlens)
    starts = torch.tensor([sum(qlens[:i]) for i in range(r + 1)], dtype=torch.int32)
    q = torch.randn(tokens, heads * g, d).to(dtype)
    k, v = torch.randn(tokens, heads, d).to(dtype), torch.randn(tokens, heads, d).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    wide = torch.full((tokens, heads * g, 2 * d), 7.0, dtype=dtype)
    out = wide[:, :, :d]  # rows of d, a stride of 2d between heads
    ops.attend_groups(q, k, v, cache, table, lens, starts, groups, d ** -0.5, out)
    for grp, (kc, vc) in zip(layout, codecs):
        qh = grp.query_heads(g)
        args = (q[:, qh], k[:, grp.heads], v[:, grp.heads], grp.view(cache), table)
        want = (ref.decode_attention(*args, lens, kc, vc, d ** -0.5) if mode == "decode" else
                ref.prefill_attention_varlen(*args, starts.tolist(), lens, kc, vc, d ** -0.5))
        assert _within_bf16(out[:, qh], want) <= 0, f"heads {grp.start}-{grp.stop}"
    assert (out[:, 3 * g:4 * g] == 7.0).all() and (wide[:, :, d:] == 7.0).all()


def test_int_dots_where_they_apply():
    """Integer key dots (AVX-512 VNNI hosts) take keys of <= 4 bits whose code words stay
    inside a channel group and whose code planes are whole 16-byte chunks; the others stay
    float. Either way the tests above hold the output to TOL."""
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    assert ops.int_dot_keys(PRESETS["k4v3"].key, 64) == vnni
    assert ops.int_dot_keys(PRESETS["k3v4"].key, 128) == vnni
    assert not ops.int_dot_keys(PRESETS["k3v4"].key, 64)  # 8-byte high plane
    assert not ops.int_dot_keys(PRESETS["k8v8"].key, 64)
    assert not ops.int_dot_keys(PRESETS["bf16"].key, 64)
    assert not ops.int_dot_keys(CUSTOM["k1g8r_v8g16"].key, 64)  # a word spans 4 groups


def test_work_items_run_on_every_thread():
    """The kernels' loops run on torch's threads: the build compiles at::parallel_for's
    OpenMP pragma into the kernels (-fopenmp). Without it every loop ran on one thread, and
    nothing but wall-clock time showed it."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ops.parallel_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_writes_match_the_torch_writes(dtype):
    """ops.write_ring leaves the ring exactly as window.write_ring does: fresh shapes, K/V
    as the backend passes them (views of the step's [T, H, D] rows with a token stride that
    is not H * D), kept tokens at distinct ring indices, the others to the spare slot -1."""
    from vllm_kvq.window import write_ring
    for _ in range(20):
        slots, size, h, d = random.randint(2, 9), random.randint(1, 20), random.randint(1, 4), \
            random.choice([8, 64, 128])
        n = random.randint(0, 3 * size)
        owner = torch.randint(-1, slots - 1, (n,), dtype=torch.int32)
        positions = torch.randint(0, 10_000, (n,), dtype=torch.int32)
        for slot in range(slots - 1):  # a slot keeps at most R tokens, at distinct indices
            mine = (owner == slot).nonzero().flatten()
            owner[mine[size:]] = -1
            mine = mine[:size]
            index = torch.randperm(size, dtype=torch.int32)[:mine.numel()]
            positions[mine] = index + size * torch.randint(0, 500, (mine.numel(),),
                                                            dtype=torch.int32)
        both = torch.randn(n + 2, 2 * h, d).to(dtype)  # k and v: views with a token stride
        key, value = both[:, :h], both[:, h:]
        want = [torch.randn(slots, size, h, d).to(dtype) for _ in range(2)]
        got = [x.clone() for x in want]
        write_ring(*want, key, value, owner, positions)
        ops.write_ring(*got, key, value, owner, positions)
        for g, w in zip(got, want):  # the spare slot takes several tokens: any may win
            assert torch.equal(g[:-1], w[:-1])


def test_prompt_products_run_on_amx_where_the_host_has_it():
    """AMX hosts compute prompt chunks' scores and weighted values as bf16 tile products
    (csrc/kvq_cpu.cpp, "prompt chunks on AMX"); elsewhere the vector paths do. Either way
    the prefill tests hold the outputs to TOL; this one makes sure the AMX path is the one
    they ran where it exists, and runs it on fixed shapes that use it (16+ rows per item,
    8-bit and 3-bit codes, both head-size tiles, a padded last row block)."""
    flags = open("/proc/cpuinfo").read()
    wanted = ("amx_bf16" in flags and "avx512_vnni" in flags
              and os.environ.get("VLLM_KVQ_CPU_AMX", "1") != "0")
    assert ops.amx_prompts() == wanted
    for name, d, (h, g), qlens in [("k4v2", 64, (3, 3), [45, 7]), ("k4v3", 128, (2, 4), [37]),
                                   ("k8v4", 64, (1, 8), [20, 70]),
                                   ("k3g32_v3g16r", 128, (1, 1), [90])]:
        kc, vc = _codecs(name, d, h, torch.bfloat16)
        ctx = [random.randint(0, 100) for _ in qlens]
        bs = 16
        per_req = -(-max(c + n for c, n in zip(ctx, qlens)) // bs)
        cache = junk_cache(len(qlens) * per_req + 2, h, bs, _format(name).slot_bytes(d))
        table = random_block_tables(len(qlens), per_req, cache.shape[0])
        fill_context(cache, table, [c + n for c, n in zip(ctx, qlens)], kc, vc, d,
                     torch.bfloat16)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        q = torch.randn(qsl[-1], h * g, d).bfloat16()
        k, v = torch.randn(qsl[-1], h, d).bfloat16(), torch.randn(qsl[-1], h, d).bfloat16()
        lens = torch.tensor(ctx, dtype=torch.int32)
        want = ref.prefill_attention_varlen(q, k, v, cache, table, qsl, lens, kc, vc, d ** -0.5)
        got = ops.prefill_attention_varlen(q, k, v, cache, table, qsl, lens, kc, vc, d ** -0.5)
        err = (got - want).abs().max().item()
        assert err <= TOL, f"{name} D{d}: {err:.2e}"
        # A bfloat16 output (a bf16 model's, written in place): within TOL before the rounding.
        out = torch.empty(q.shape, dtype=torch.bfloat16)
        ops.attend_groups(q, k, v, cache, table, lens, torch.tensor(qsl, dtype=torch.int32),
                          ops.KernelGroups.uniform(cache, kc, vc), d ** -0.5, out)
        assert _within_bf16(out, want) <= 0, f"{name} D{d}, bfloat16 output"


@pytest.mark.parametrize("name", ["bf16", "k4v3", "k4v2", "k8v4", "k3g32_v3g16r",
                                  "k1g8r_v8g16", "k4g64r_v2g64r"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("semantics", ["past_only", "prefill_exact"])
def test_prefill_matches_reference(name, d, semantics):
    dtype = torch.bfloat16
    h, g = random.choice([(1, 1), (2, 4), (3, 3)])
    bs, r = random.choice([16, 32]), random.randint(1, 4)
    window = random.choice([0, 16])
    kc, vc = _codecs(name, d, h, dtype)
    qlens = [random.choice([1, random.randint(2, 40), random.randint(40, 90)])
             for _ in range(r)]
    ctx = [random.choice([0, random.randint(1, 100)]) for _ in range(r)]
    exact = [min(window, c, random.randint(0, window)) for c in ctx]
    packed = [c - e for c, e in zip(ctx, exact)]
    per_req = -(-max(c + q for c, q in zip(ctx, qlens)) // bs)
    cache = junk_cache(r * per_req + 2, h, bs, _format(name).slot_bytes(d))
    table = random_block_tables(r, per_req, cache.shape[0])
    # every token up to the chunk's end is stored before attention (the chunk's own too)
    fill_context(cache, table, [c + q for c, q in zip(ctx, qlens)], kc, vc, d, dtype)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    t = qsl[-1]
    q = torch.randn(t, h * g, d).to(dtype)
    k, v = torch.randn(t, h, d).to(dtype), torch.randn(t, h, d).to(dtype)
    kw = {}
    if window:
        kw = dict(ring=_ring(r + 1, window, h, d, dtype),
                  window_slots=torch.randperm(r + 1)[:r].to(torch.int32),
                  window_exact=torch.tensor(exact, dtype=torch.int32))
    if semantics == "past_only":
        limits = []
        for c, n, p in zip(ctx, qlens, packed):
            limits += list(prefill_packed_limits(c, n, p, window, bs))
        kw["packed_limits"] = torch.tensor(limits, dtype=torch.int32)
    lens = torch.tensor(packed, dtype=torch.int32)
    scale = d ** -0.5
    want = ref.prefill_attention_varlen(q, k, v, cache, table, qsl, lens, kc, vc, scale, **kw)
    for split in (0, 32):
        got = ops.prefill_attention_varlen(q, k, v, cache, table, qsl, lens, kc, vc, scale,
                                           split_tokens=split, **kw)
        err = (got - want).abs().max().item()
        assert torch.isfinite(got).all() and err <= TOL, f"split {split}: {err:.2e}"


@pytest.mark.parametrize("name", ["bf16", "k4v3", "k4v2", "k8v4", "k3g32_v3g16r"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("mode", ["decode", "past_only", "prefill_exact"])
def test_sliding_window_matches_reference(name, d, mode):
    """A sliding-window layer (``first_keys``): freed blocks behind the windows hold NaN
    bytes (``sliding_case``); the tiles before each work item's lowest first key are never
    read, each row masks its own bound, exact keys before it are skipped."""
    args, kw, what = sliding_case(name, decode=mode == "decode", head_size=d,
                                  gqa=random.choice([1, 3, 4, 8]),
                                  block_size=random.choice([16, 32]),
                                  dtype=random.choice([torch.bfloat16, torch.float16]),
                                  past_only=mode == "past_only")
    run_ref, run = ((ref.decode_attention, ops.decode_attention) if mode == "decode" else
                    (ref.prefill_attention_varlen, ops.prefill_attention_varlen))
    want = run_ref(*args, **kw)
    for split in (0, 16, 48):
        got = run(*args, split_tokens=split, **kw)
        err = (got - want).abs().max().item()
        assert torch.isfinite(got).all() and err <= TOL, f"{what} split {split}: {err:.2e}"


@pytest.mark.parametrize("name", ["k1g8_v3g8", "k4g8_v2g8"])
@pytest.mark.parametrize("d", [72, 80])
def test_head_sizes_off_the_vector_unpack(name, d):
    """Codes become floats as vectors when a token's code plane is whole 32-bit words and runs
    of 16 codes; other head sizes (72: no 16-code runs; 80: 1-bit planes of 10 bytes) take the
    per-byte tables, with the same results."""
    test_store_bytes_identical(name, d, random.choice([torch.bfloat16, torch.float16]))
    test_decode_matches_reference(name, d)


def test_gaps_name_what_is_not_read():
    kivi = LayerFormat(storage_format("kivi", bits=2), storage_format("int", 2, 32, False))
    lloyd = LayerFormat(storage_format("lloyd", bits=4), storage_format("int", 2, 32, True))
    assert ops.gap(kivi, 64, torch.bfloat16) is not None
    assert ops.gap(lloyd, 64, torch.bfloat16) is not None
    assert "head size 96" in ops.gap(PRESETS["k4v3"], 96, torch.bfloat16)
    assert ops.gap(PRESETS["k8v8"], 96, torch.bfloat16) is None  # unrotated: any head size
    assert "float32" in ops.gap(PRESETS["k4v3"], 64, torch.float32)


def test_without_a_compiler_layers_fall_back_to_torch(tmp_path):
    """A machine that cannot build the kernels logs why and serves the torch path under auto;
    forcing them is refused with one sentence."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from vllm_kvq import dispatch, paged_attention\n"
        "from vllm_kvq.config import PRESETS, KVQConfigError\n"
        "from vllm_kvq.cpu_kernel.build import load\n"
        "reason = load()\n"
        "assert reason and 'could not be built' in reason, reason\n"
        "fmt = PRESETS['k4v3']\n"
        "assert dispatch.check_kernel_choice('cpu', [fmt], 64, torch.bfloat16) == [0]\n"
        "assert dispatch.attention_ops('cpu', fmt, 64, torch.bfloat16) is paged_attention\n"
        "import os; os.environ['VLLM_KVQ_KERNELS'] = 'cpu'\n"
        "try:\n"
        "    dispatch.check_kernel_choice('cpu', [fmt], 64, torch.bfloat16)\n"
        "    raise SystemExit('forced CPU kernels were not refused')\n"
        "except KVQConfigError as err:\n"
        "    assert 'could not be built' in str(err) and '\\n' not in str(err), err\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), VLLM_KVQ_BUILD_DIR=str(tmp_path),
               VLLM_KVQ_KERNELS="auto")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def survey(draws: int) -> None:
    """The largest decode error per format and head size over fresh draws (what TOL's
    measured margin rests on): ``python -m tests.test_cpu_kernel [draws]``."""
    assert load() is None
    for name in FORMATS:
        for d in (64, 128, 256):
            worst = max(max(decode_errors(name, d)) for _ in range(draws))
            print(f"{name:14} d={d:3}  max error over {draws} draws: {worst:.2e}")


if __name__ == "__main__":
    import sys

    survey(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
