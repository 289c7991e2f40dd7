"""Store kernel vs ``paged_attention.store_slots`` (the torch reference), byte for byte.

Tolerances, per field (justification):
- raw fields and non-rotated int fields: exact. The kernel does the reference's operations
  in the same order on the same fp32 inputs (min/max, correctly rounded division, RTNE fp16
  casts, round-half-to-even codes), so nothing can differ.
- rotated int fields: R x is an fp32 dot whose summation order differs from torch's einsum,
  so a rotated value can differ in its last fp32 bit. That can move a group's fp16 scale or
  min by one ulp, and a code that sits at a .5 rounding boundary by one level. Allowed: fp16
  scales/mins within 1 ulp, codes within 1 level, and both in at most 1% of entries (in
  practice a few per million).
- QJL: sign bits can flip only where S k_in is ~1e-7 relative to its size (fp32 summation
  order): at most 0.5% of bits. The fp16 norm within 1 ulp (fp32 reduction order). Outlier
  indices/values exact. topk's choice among equal |k| is unspecified, and bf16 rows tie at
  the o-th/(o+1)-th largest |k| often (8% of D=256 rows with 4 outliers), so the test
  redraws such rows before storing: every row it stores is then checked exactly.
- padding slots (-1) must leave their slot untouched; pad bytes are zero.
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.formats import bits as bitpack
from vllm_kvq.formats.int_group import IntGroupCodec
from vllm_kvq.formats.qjl import QJLKeyCodec
from vllm_kvq.formats.raw import RawCodec
from vllm_kvq.kernels import api

from .helpers import FORMAT_NAMES, PRESET_NAMES, codecs, junk_cache


def _f16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ia = a.contiguous().view(torch.int16).int()
    ib = b.contiguous().view(torch.int16).int()
    return (ia - ib).abs()


def _check_int(codec: IntGroupCodec, got: torch.Tensor, want: torch.Tensor, what: str):
    if codec.rot is None:
        assert torch.equal(got, want), f"{what}: non-rotated int field differs"
        return
    cb, gb = codec.code_bytes, 2 * codec.groups
    side_g, side_w = got[:, cb:cb + 2 * gb], want[:, cb:cb + 2 * gb]
    ulps = _f16_ulps(side_g, side_w)
    assert ulps.max() <= 1, f"{what}: scale/min off by {ulps.max()} fp16 ulps"
    assert (ulps > 0).float().mean() <= 0.01, f"{what}: too many scale/min differences"
    cg = bitpack.unpack(got[:, :cb], codec.bits).int()
    cw = bitpack.unpack(want[:, :cb], codec.bits).int()
    dc = (cg - cw).abs()
    assert dc.max() <= 1, f"{what}: codes off by {dc.max()}"
    assert (dc > 0).float().mean() <= 0.01, f"{what}: {(dc > 0).float().mean():.4f} codes differ"


def _outlier_tie(keys: torch.Tensor, outliers: int) -> torch.Tensor:
    """Rows (any leading shape) whose o-th and (o+1)-th largest |k| are equal."""
    top = keys.float().abs().sort(-1, descending=True).values
    return top[..., outliers - 1] == top[..., outliers]


def _redraw_outlier_ties(keys: torch.Tensor, outliers: int) -> None:
    """Redraw, in place, the rows whose outlier choice topk may break either way."""
    while (tie := _outlier_tie(keys, outliers)).any():
        fresh = torch.randn(int(tie.sum()), keys.shape[-1]) * keys.float().std()
        keys[tie] = fresh.to(keys.dtype)


def _check_qjl(codec: QJLKeyCodec, got, want, keys: torch.Tensor, what: str):
    o, sb = codec.outliers, codec.sign_bytes
    if o:
        assert not _outlier_tie(keys, o).any(), f"{what}: test input has outlier ties"
    sg = bitpack.unpack(got[:, :sb], 1)
    sw = bitpack.unpack(want[:, :sb], 1)
    assert (sg != sw).float().mean() <= 0.005, f"{what}: sign bits differ"
    assert _f16_ulps(got[:, sb:sb + 2], want[:, sb:sb + 2]).max() <= 1, f"{what}: norm"
    assert torch.equal(got[:, sb + 2:], want[:, sb + 2:]), f"{what}: outliers differ"


def _check_field(codec, got, want, keys, what):
    if isinstance(codec, RawCodec):
        assert torch.equal(got, want), f"{what}: raw field differs"
    elif isinstance(codec, IntGroupCodec):
        _check_int(codec, got, want, what)
    else:
        _check_qjl(codec, got, want, keys, what)


def _run_store(name: str, head_size: int, seed: int):
    dtype = random.choice([torch.bfloat16, torch.float16])
    h = random.randint(1, 3)
    bs = random.choice([16, 32, 64, 128])
    t = random.randrange(1, 40, 2)  # odd token counts
    num_blocks = -(-t // bs) + random.randint(0, 2)
    fmt, kc, vc = codecs(name, head_size, h, dtype)
    sb = fmt.slot_bytes(head_size)
    slots = torch.randperm(num_blocks * bs)[:t]
    pad = torch.rand(t) < 0.2
    slots[pad] = -1
    key = (torch.randn(t, h, head_size) * random.choice([0.5, 1.0, 4.0])).to(dtype)
    value = torch.randn(t, h, head_size).to(dtype)
    if random.random() < 0.5:  # non-contiguous views, as vLLM's qkv split produces
        key = torch.randn(t, h, 2 * head_size).to(dtype)[..., :head_size]
    if isinstance(kc, QJLKeyCodec) and kc.outliers:
        _redraw_outlier_ties(key, kc.outliers)
    junk = junk_cache(num_blocks, h, bs, sb)
    want, got = junk.clone(), junk.clone()
    ref.store_slots(key, value, want, slots, kc, vc)
    api.store_slots(key, value, got, slots, kc, vc)

    what = f"{name} D={head_size} H={h} bs={bs} T={t} {dtype} seed={seed}"
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_g = got.permute(0, 2, 1, 3).reshape(num_blocks * bs, h, sb)
    flat_w = want.permute(0, 2, 1, 3).reshape(num_blocks * bs, h, sb)
    flat_j = junk.permute(0, 2, 1, 3).reshape(num_blocks * bs, h, sb)
    assert torch.equal(flat_g[~written], flat_j[~written]), f"{what}: touched a foreign slot"
    valid = slots >= 0
    if not valid.any():
        return
    g = flat_g[slots[valid]].reshape(-1, sb)
    w = flat_w[slots[valid]].reshape(-1, sb)
    kb, vb = kc.nbytes, vc.nbytes
    assert torch.equal(g[:, kb + vb:], torch.zeros_like(g[:, kb + vb:])), f"{what}: pad bytes"
    keys = key[valid].reshape(-1, head_size)
    _check_field(kc, g[:, :kb], w[:, :kb], keys, f"{what} keys")
    _check_field(vc, g[:, kb:kb + vb], w[:, kb:kb + vb], None, f"{what} values")


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_store_presets(name, head_size, seed):
    _run_store(name, head_size, seed)


@pytest.mark.parametrize("name", [n for n in FORMAT_NAMES if n not in PRESET_NAMES])
def test_store_custom_formats(name, seed):
    _run_store(name, random.choice([64, 128]), seed)


def test_store_all_padding(seed):
    fmt, kc, vc = codecs("k4v2", 64, 2)
    cache = junk_cache(2, 2, 16, fmt.slot_bytes(64))
    before = cache.clone()
    k = torch.randn(5, 2, 64).to(torch.bfloat16)
    api.store_slots(k, k, cache, torch.full((5,), -1), kc, vc)
    assert torch.equal(cache, before)
