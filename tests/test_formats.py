"""Storage formats: byte layouts, slot sizes, reconstruction bounds, seeded maps, and the QJL
estimator's bias and variance against theory -- on random data and on keys captured from the
real model.

Inputs are drawn fresh every run (see the ``seed`` fixture; the seed is printed on
failure). Statistical checks use thresholds several standard deviations wide.
"""

import math
import random

import numpy as np
import pytest
import torch

from vllm_kvq.config import PRESETS
from vllm_kvq.formats import SLOT_ALIGN, LayerFormat, build_codecs, storage_format
from vllm_kvq.formats import bits as bitpack
from vllm_kvq.formats.int_group import IntGroupCodec
from vllm_kvq.formats.qjl import QJLKeyCodec
from vllm_kvq.formats.random_maps import qjl_projection, rotation
from vllm_kvq.formats.raw import RawCodec

pytestmark = pytest.mark.usefixtures("one_thread", "seed")

FP16_EPS = 2.0 ** -11  # relative rounding error of fp16 (round to nearest, 11-bit significand)


# ----------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    n = 8 * random.randint(1, 40)
    codes = torch.randint(0, 1 << bits, (3, 5, n), dtype=torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, n * bits // 8)
    assert torch.equal(bitpack.unpack(packed, bits), codes)


@pytest.mark.parametrize("bits, codes, expected", [
    # code i sits in byte i // (8 // b) at bit offset (i % (8 // b)) * b: little-endian.
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0], [0b10001101, 0b00000010]),
    (2, [3, 0, 1, 2, 0, 0, 0, 1], [0b10010011, 0b01000000]),
    (4, [0xA, 0x5, 0x0, 0xF], [0x5A, 0xF0]),
    (8, [7, 200, 0, 255], [7, 200, 0, 255]),
    # 3 bits: the plane of low two bits (2-bit packing), then the plane of high bits
    (3, [5, 3, 7, 0, 1, 2, 6, 4], [0b00111101, 0b00101001, 0b11000101]),
])
def test_pack_known_bytes(bits, codes, expected):
    packed = bitpack.pack(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.tolist() == expected
    assert bitpack.unpack(torch.tensor(expected, dtype=torch.uint8), bits).tolist() == codes


def test_one_bit_order_matches_numpy_little_endian():
    codes = torch.randint(0, 2, (7, 64), dtype=torch.uint8)
    ours = bitpack.pack(codes, 1).numpy()
    assert np.array_equal(ours, np.packbits(codes.numpy(), axis=-1, bitorder="little"))


def test_fp16_bytes_round_trip():
    x = torch.randn(4, 6) * 100
    b = bitpack.as_fp16_bytes(x)
    assert b.dtype == torch.uint8 and b.shape == (4, 12)
    assert torch.equal(bitpack.from_fp16_bytes(b), x.half().float())
    # little-endian fp16: 1.0 = 0x3C00, -2.0 = 0xC000
    assert bitpack.as_fp16_bytes(torch.tensor([1.0, -2.0])).tolist() == [0x00, 0x3C, 0x00, 0xC0]


# ----------------------------------------------------------------------------------------------
# Slot sizes
# ----------------------------------------------------------------------------------------------

# Hand-computed bytes per token and KV head, before padding: raw 2D; int D*b/8 + 4*D/G (fp16
# scale + fp16 min per group of G=32); QJL m/8 sign bytes + 2 (fp16 norm) + 3 per outlier
# (fp16 value + uint8 index). Slots are then padded up to a multiple of 16.
#                 (key bytes, value bytes, slot bytes) at D = 64, 128, 256
EXPECTED = {
    "bf16":     {64: (128, 128, 256), 128: (256, 256, 512), 256: (512, 512, 1024)},
    "k8v8":     {64: (72, 72, 144), 128: (144, 144, 288), 256: (288, 288, 576)},
    "k8v4":     {64: (72, 40, 112), 128: (144, 80, 224), 256: (288, 160, 448)},
    "k4v4":     {64: (40, 40, 80), 128: (80, 80, 160), 256: (160, 160, 320)},
    "k4v2":     {64: (40, 24, 64), 128: (80, 48, 128), 256: (160, 96, 256)},
    "k2v2":     {64: (24, 24, 48), 128: (48, 48, 96), 256: (96, 96, 192)},
    # 64-channel groups: 4-bit keys D/2 + 4*D/64, 3-bit values 3D/8 + 4*D/64
    "k4v3":     {64: (36, 28, 64), 128: (72, 56, 128), 256: (144, 112, 256)},
    "k3v4":     {64: (28, 36, 64), 128: (56, 72, 128), 256: (112, 144, 256)},
    # 32 + 2 + 12 = 46 key bytes whatever D; 46 + 40 = 86 -> 88, 46 + 80 = 126 -> 128, ...
    "qjl256v4": {64: (46, 40, 88), 128: (46, 80, 128), 256: (46, 160, 208)},
    "qjl256v2": {64: (46, 24, 72), 128: (46, 48, 96), 256: (46, 96, 144)},
    "qjl128v2": {64: (30, 24, 56), 128: (30, 48, 80), 256: (30, 96, 128)},
}


def test_every_preset_has_expected_sizes():
    assert set(EXPECTED) == set(PRESETS)


@pytest.mark.parametrize("preset", list(EXPECTED))
@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_preset_slot_bytes(preset, head_size):
    fmt = PRESETS[preset]
    key_bytes, value_bytes, slot = EXPECTED[preset][head_size]
    assert fmt.key.nbytes(head_size) == key_bytes
    assert fmt.key_bytes(head_size) == key_bytes
    assert fmt.value.nbytes(head_size) == value_bytes
    assert fmt.slot_bytes(head_size) == slot
    assert slot % SLOT_ALIGN == 0 and slot - SLOT_ALIGN < key_bytes + value_bytes <= slot
    assert fmt.bits_per_element(head_size) == slot * 8 / (2 * head_size)
    assert fmt.compression(head_size) == 4 * head_size / slot
    # The codecs built from the format encode to exactly the counted bytes.
    k_codec, v_codec = build_codecs(fmt, head_size, torch.bfloat16, 0, 1, [0, 1])
    x = torch.randn(3, 2, head_size).bfloat16()
    assert k_codec.nbytes == key_bytes and k_codec.encode(x).shape == (3, 2, key_bytes)
    assert v_codec.nbytes == value_bytes and v_codec.encode(x).shape == (3, 2, value_bytes)


def test_codec_spec_sizes_off_preset():
    assert storage_format("int", bits=1, group_size=8).nbytes(64) == 8 + 4 * 8
    assert storage_format("int", bits=2, group_size=64).nbytes(128) == 32 + 4 * 2
    assert storage_format("qjl", sketch_dim=512, outliers=8).nbytes(128) == 64 + 2 + 24
    assert storage_format("qjl", sketch_dim=64, outliers=0).nbytes(64) == 8 + 2
    assert LayerFormat(storage_format("qjl", sketch_dim=64, outliers=0),
                       storage_format("int", bits=1, group_size=64)).slot_bytes(64) == 24  # 10+12=22
    with pytest.raises(ValueError):
        storage_format("fp8").nbytes(64)


# ----------------------------------------------------------------------------------------------
# Raw
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_raw_is_exact(dtype):
    x = (torch.randn(5, 3, 64) * 30).to(dtype)
    codec = RawCodec(64, dtype)
    packed = codec.encode(x)
    assert packed.shape == (5, 3, 128) and codec.nbytes == 128
    assert torch.equal(codec.decode(packed), x.float())
    assert torch.equal(packed, x.contiguous().view(torch.uint8))
    one = RawCodec(2, torch.bfloat16).encode(torch.tensor([[[1.0, -2.0]]]))
    assert one.flatten().tolist() == [0x80, 0x3F, 0x00, 0xC0]  # bf16 1.0 = 0x3F80, -2.0 = 0xC000


# ----------------------------------------------------------------------------------------------
# Per-token group integer codes
# ----------------------------------------------------------------------------------------------

def test_int_known_byte_layout():
    """D=16, G=8, 4 bits: [codes: 8 bytes | scales: 2 x fp16 | mins: 2 x fp16]."""
    g0 = [0, 15, 3, 4, 5, 6, 7, 8]  # min 0, max 15 -> scale 1, codes = values
    c1 = [0, 15, 1, 2, 9, 10, 11, 12]
    g1 = [-2 + 2 * c for c in c1]  # min -2, max 28 -> scale 2
    x = torch.tensor([g0 + g1], dtype=torch.float32).view(1, 1, 16)
    codec = IntGroupCodec(16, 4, 8, False, 0, 0, [0])
    packed = codec.encode(x).flatten().tolist()
    assert len(packed) == codec.nbytes == 16
    codes = g0 + c1
    assert packed[:8] == [codes[2 * i] | codes[2 * i + 1] << 4 for i in range(8)]
    assert packed[:2] == [0xF0, 0x43]
    assert packed[8:12] == [0x00, 0x3C, 0x00, 0x40]  # fp16 1.0, 2.0
    assert packed[12:16] == [0x00, 0x00, 0x00, 0xC0]  # fp16 0.0, -2.0
    assert torch.equal(codec.decode(torch.tensor(packed, dtype=torch.uint8)), x.flatten())


def _group_stats(codec: IntGroupCodec, packed: torch.Tensor):
    cb, gb = codec.code_bytes, 2 * codec.groups
    scale = bitpack.from_fp16_bytes(packed[..., cb:cb + gb])
    lo = bitpack.from_fp16_bytes(packed[..., cb + gb:cb + 2 * gb])
    return scale, lo


@pytest.mark.parametrize("bits, group_size, rotate, head_size", [
    (8, 32, False, 64), (8, 16, True, 128), (4, 32, True, 64), (4, 64, False, 256),
    (4, 8, False, 128), (2, 32, True, 128), (2, 32, False, 256),
    (2, 16, True, 96),  # 96: not a power of two -> QR rotation
    (3, 64, True, 64), (3, 32, False, 128), (3, 16, True, 96),  # 3-bit planes
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_error_within_half_step(bits, group_size, rotate, head_size, dtype):
    """|x - x_hat| <= scale/2 per element, plus the fp16 rounding of the stored scale and min
    (which only matters at the clamped ends of the code range). 1-bit codes store centroids,
    not the extremes: see test_one_bit_codes_store_the_two_centroids."""
    t, h = 37, 3
    x = (torch.randn(t, h, head_size) * torch.rand(t, h, 1) * 10).to(dtype)
    x[0, 0, :] = 0.0  # a constant group (scale 0) must come back exactly
    codec = IntGroupCodec(head_size, bits, group_size, rotate, random.randrange(1 << 30),
                          random.randrange(64), random.sample(range(64), h))
    packed = codec.encode(x)
    assert packed.shape == (t, h, codec.nbytes)
    target = codec.to_codec_domain(x.float().transpose(0, 1)).transpose(0, 1)  # R x per head
    err = (codec.decode(packed) - target).abs().unflatten(-1, (-1, group_size))
    scale16, lo16 = _group_stats(codec, packed)
    g = target.unflatten(-1, (-1, group_size))
    lo, hi = g.amin(-1), g.amax(-1)
    levels = (1 << bits) - 1
    slack = (lo - lo16).abs() + levels * ((hi - lo) / levels - scale16).abs()
    bound = scale16 / 2 + slack + 1e-5 * g.abs().amax(-1)
    assert (err <= bound.unsqueeze(-1)).all(), (err - bound.unsqueeze(-1)).max()
    # The fp16 side values are the group's own statistics (fp16 rounding, plus fp32 noise of
    # our R x against the codec's, which rotates in float64).
    noise = 1e-5 * g.abs().amax(-1) + 1e-7
    assert ((lo16 - lo).abs() <= FP16_EPS * lo.abs() + noise).all()
    assert ((scale16 - (hi - lo) / levels).abs() <= FP16_EPS * (hi - lo) / levels + noise).all()
    if not rotate:
        assert torch.equal(codec.decode(packed)[0, 0], torch.zeros(head_size))


@pytest.mark.parametrize("rotate", [False, True])
def test_int_one_bit_stores_the_group_centroids(rotate):
    """1-bit levels: the means of the group's elements at or below / above its midpoint (fp16),
    every element stored as the nearer level."""
    d, gs = 128, 32
    codec = IntGroupCodec(d, 1, gs, rotate, random.randrange(1 << 30), 3, [0, 5])
    x = torch.randn(50, 2, d) * 3
    packed = codec.encode(x)
    y = codec.decode(packed).unflatten(-1, (-1, gs))
    target = codec.to_codec_domain(x.transpose(0, 1)).transpose(0, 1).unflatten(-1, (-1, gs))
    up = target > ((target.amin(-1) + target.amax(-1)) / 2).unsqueeze(-1)
    low = ((target * ~up).sum(-1) / (~up).sum(-1)).unsqueeze(-1)
    high = ((target * up).sum(-1) / up.sum(-1)).unsqueeze(-1)
    scale16, lo16 = _group_stats(codec, packed)
    lo16, hi16 = lo16.unsqueeze(-1), (lo16 + scale16).unsqueeze(-1)
    assert ((y == lo16) | (y == hi16)).all()
    noise = 1e-5 * target.abs().amax(-1, keepdim=True)  # fp32 R x vs the codec's float64
    assert ((lo16 - low).abs() <= FP16_EPS * low.abs() + noise).all()
    assert ((hi16 - high).abs() <= FP16_EPS * (low.abs() + (high - low)) * 1.01 + noise).all()
    gap = 1e-3 * (high - low)  # ties aside
    nearer_hi = (target - lo16).abs() > (hi16 - target).abs() + gap
    nearer_lo = (hi16 - target).abs() > (target - lo16).abs() + gap
    assert (y[nearer_hi] == hi16.expand_as(y)[nearer_hi]).all()
    assert (y[nearer_lo] == lo16.expand_as(y)[nearer_lo]).all()


def test_int_rotated_round_trip_and_scores():
    """Rotated codes: queries rotated for scores, outputs rotated back, both exact maps."""
    d, h = 128, 2
    codec = IntGroupCodec(d, 8, 32, True, random.randrange(1 << 30), 7, [1, 4])
    x = torch.randn(h, 9, d)
    assert torch.allclose(codec.finish_output(codec.to_codec_domain(x)), x, atol=1e-5)
    k = torch.randn(20, h, d)
    packed = codec.encode(k).transpose(0, 1)  # [H, N, C]
    k_hat = codec.finish_output(codec.decode(packed))  # model space
    q = torch.randn(h, 5, d)
    scores = codec.scores(codec.prepare_queries(q), packed)
    assert torch.allclose(scores, q @ k_hat.transpose(-1, -2), atol=1e-4)
    # and k_hat is close to k (8-bit codes)
    assert (k_hat - k.transpose(0, 1)).abs().max() < 0.1


def test_rotation_tames_channel_outliers():
    """A few huge channels stretch every unrotated group's range; the rotation spreads them."""
    d = 128
    x = torch.randn(200, 1, d)
    x[..., torch.randperm(d)[:2]] *= 30
    plain = IntGroupCodec(d, 4, 32, False, 0, 0, [0])
    rot = IntGroupCodec(d, 4, 32, True, random.randrange(1 << 30), 0, [0])
    err_plain = (plain.decode(plain.encode(x)) - x).pow(2).mean()
    err_rot = (rot.decode(rot.encode(x)) - rot.to_codec_domain(x.transpose(0, 1)).transpose(0, 1)
               ).pow(2).mean()
    assert err_rot < 0.5 * err_plain


# ----------------------------------------------------------------------------------------------
# Seeded random maps
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [64, 128, 256, 80, 96])
def test_rotation_orthogonal_and_deterministic(dim):
    seed, layer, head = random.randrange(1 << 30), random.randrange(64), random.randrange(64)
    state = torch.get_rng_state()
    r = rotation(seed, layer, head, dim)
    assert torch.equal(torch.get_rng_state(), state), "must not touch the global RNG"
    assert r.shape == (dim, dim)
    assert torch.allclose(r @ r.T, torch.eye(dim), atol=1e-5)
    torch.manual_seed(random.randrange(1 << 30))  # global RNG state must not matter
    assert torch.equal(rotation(seed, layer, head, dim), r)
    others = [rotation(seed, layer, head + 1, dim), rotation(seed, layer + 1, head, dim),
              rotation(seed + 1, layer, head, dim)]
    for other in others:
        assert (other - r).abs().max() > 0.1
    if dim & (dim - 1) == 0:  # randomized Hadamard: every entry +-1/sqrt(dim)
        assert torch.allclose(r.abs(), torch.full_like(r, dim ** -0.5))


@pytest.mark.parametrize("dim, sketch_dim", [(64, 256), (128, 256), (128, 192), (256, 256)])
def test_qjl_projection_blocks(dim, sketch_dim):
    seed, layer, head = random.randrange(1 << 30), random.randrange(64), random.randrange(64)
    state = torch.get_rng_state()
    s = qjl_projection(seed, layer, head, sketch_dim, dim)
    assert torch.equal(torch.get_rng_state(), state), "must not touch the global RNG"
    assert s.shape == (sketch_dim, dim)
    assert torch.equal(qjl_projection(seed, layer, head, sketch_dim, dim), s)
    for other in (qjl_projection(seed, layer, head + 1, sketch_dim, dim),
                  qjl_projection(seed, layer + 1, head, sketch_dim, dim),
                  qjl_projection(seed + 1, layer, head, sketch_dim, dim)):
        assert (other - s).abs().max() > 0.1
    norms = s.norm(dim=1)
    for start in range(0, sketch_dim, dim):  # rows orthogonal inside each block of dim rows
        blk = s[start:start + dim]
        gram = blk @ blk.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-3 * dim
    # Row lengths are chi(dim): mean ~sqrt(dim), std ~0.71.
    assert abs(norms.mean().item() - math.sqrt(dim)) < 0.5
    assert norms.std().item() < 1.2


def test_codecs_key_and_value_maps_differ():
    fmt = LayerFormat(storage_format("int", 4, 32, True), storage_format("int", 4, 32, True))
    k, v = build_codecs(fmt, 64, torch.bfloat16, 5, 2, [0, 1])
    assert not torch.equal(k.rot, v.rot)
    assert not torch.equal(k.rot[0], k.rot[1])
    k2, _ = build_codecs(fmt, 64, torch.bfloat16, 5, 2, [1])  # head 1 alone (another TP rank)
    assert torch.equal(k2.rot[0], k.rot[1])


# ----------------------------------------------------------------------------------------------
# QJL: layout
# ----------------------------------------------------------------------------------------------

def test_qjl_known_byte_layout():
    """m=64 rows = identity (so the sign bits are the signs of k_in) and one outlier."""
    d = 64
    codec = QJLKeyCodec(d, 64, 1, 0, 0, [0])
    codec.proj = torch.eye(d).unsqueeze(0)
    k = torch.where(torch.arange(d) % 3 == 0, -1.0, 0.5)  # signs: - + + - + + ...
    k[5] = -10.0  # the outlier: removed from the sketch (0 -> sign bit 1)
    packed = codec.encode(k.view(1, 1, d)).flatten().tolist()
    assert len(packed) == codec.nbytes == 8 + 2 + 3
    k_in = k.clone()
    k_in[5] = 0.0
    sign_bits = [int(v >= 0) for v in k_in.tolist()]
    assert packed[:8] == [sum(sign_bits[8 * i + j] << j for j in range(8)) for i in range(8)]
    assert packed[0] == 0b10110110
    assert packed[8:10] == bitpack.as_fp16_bytes(k_in.norm().view(1)).tolist()
    assert packed[10:12] == [0x00, 0xC9]  # fp16 -10.0 = 0xC900
    assert packed[12] == 5


@pytest.mark.parametrize("outliers", [0, 1, 4, 8])
def test_qjl_outliers_exact_and_removed(outliers):
    d, m = 128, 256
    codec = QJLKeyCodec(d, m, outliers, random.randrange(1 << 30), 4, [2, 3])
    k = torch.randn(40, 2, d)
    k[..., 7] *= 20
    packed = codec.encode(k)
    assert packed.shape == (40, 2, codec.nbytes)
    signs, norm, vals, idx = codec._fields(packed)
    top = k.abs().topk(outliers, -1).indices.sort(-1).values
    assert torch.equal(idx, top)
    assert torch.equal(vals, k.gather(-1, top).half().float())
    k_in = k.scatter(-1, top, 0.0)
    assert torch.allclose(norm, k_in.norm(dim=-1), rtol=FP16_EPS)
    assert torch.equal(codec.outlier_part(packed), torch.zeros_like(k).scatter(-1, top, vals))
    sketch = torch.einsum("hmd,thd->thm", codec.proj, k_in)
    clear = sketch.abs() > 1e-4 * sketch.abs().amax(-1, keepdim=True)  # fp32 vs stored order
    assert torch.equal((signs > 0)[clear], (sketch >= 0)[clear])
    assert clear.float().mean() > 0.99
    # scores() and the inspection decode() are the same estimator.
    q = torch.randn(2, 6, d)
    pk = packed.transpose(0, 1)
    assert torch.allclose(codec.scores(codec.prepare_queries(q), pk),
                          q @ codec.decode(pk).transpose(-1, -2), rtol=1e-4, atol=1e-3)


def test_qjl_junk_bytes_do_not_crash():
    """Unwritten slots hold any byte: decoding them must not index out of range."""
    codec = QJLKeyCodec(64, 256, 4, 0, 0, [0])
    junk = torch.randint(0, 256, (1, 10, codec.nbytes), dtype=torch.uint8)
    assert codec.decode(junk).shape == (1, 10, 64)
    assert codec.scores(codec.prepare_queries(torch.randn(1, 3, 64)), junk).shape == (1, 3, 10)


# ----------------------------------------------------------------------------------------------
# QJL: estimator bias and variance
# ----------------------------------------------------------------------------------------------

def qjl_errors(q: torch.Tensor, k: torch.Tensor, sketch_dim: int, outliers: int,
               projections: int, gaussian: bool = False, layer: int = 0):
    """Score errors of every (q_a, k_b) pair under ``projections`` independent sketches.

    q ``[A, D]``, k ``[B, D]``. Independent sketches are the maps of distinct global heads (or,
    with ``gaussian``, plain iid N(0, 1) matrices). Returns (errors ``[P, A, B]``, theoretical
    variance ``[A, B]`` of one sketch with iid Gaussian rows, sketched part ``[A, B]``):
    the sketch estimates <q, k_in>, k_in = k without its outlier channels, with variance
    ((pi/2) ||q||^2 ||k_in||^2 - <q, k_in>^2) / m.
    """
    d = q.shape[-1]
    codec = QJLKeyCodec(d, sketch_dim, outliers, random.randrange(1 << 30), layer,
                        list(range(projections)))
    if gaussian:
        codec.proj = torch.randn(projections, sketch_dim, d)
    packed = codec.encode(k.unsqueeze(1).expand(-1, projections, d)).transpose(0, 1)
    est = codec.scores(codec.prepare_queries(q.expand(projections, -1, -1)), packed)
    exact = q @ k.T
    k_in = k
    if outliers:
        k_in = k.scatter(-1, k.abs().topk(outliers, -1).indices, 0.0)
    sketched = q @ k_in.T
    theory = ((math.pi / 2) * q.norm(dim=-1, keepdim=True) ** 2 * k_in.norm(dim=-1) ** 2
              - sketched ** 2) / sketch_dim
    return est - exact, theory, sketched


def assert_unbiased(err: torch.Tensor, sketched: torch.Tensor):
    """The estimator is unbiased: E over sketches of the error is 0 for every pair.

    Pairs share sketches, so their errors are correlated (strongly for real keys, which share
    a few dominant channels) and a statistic pooled over pairs, such as mean z^2, has no fixed
    null distribution (it exceeded 3 in ~0.5% of draws). The sketches are the independent
    units: per sketch p, average the standardized errors over pairs, plainly and weighted by
    the sign of <q, k_in> (a wrong constant scales every estimate, so its error follows that
    sign), and t-test the P averages: t ~ N(0, 1) by the CLT whatever the correlation
    (measured sd 1.03 over 1,300 real-key draws); |t| < 5. A wrong constant (sqrt(2/pi) for
    sqrt(pi/2)) gives t in the tens, and per-pair z in the tens too: no pair may exceed 8
    (largest seen 5.0 over 92,000 pair draws)."""
    n = err.shape[0]
    sd = err.std(0).clamp_min(1e-12)
    z = err.mean(0) / (sd / math.sqrt(n))
    for weight, what in ((1.0, "common"), (torch.sign(sketched), "along <q, k_in>")):
        per_sketch = (err * weight / sd).flatten(1).mean(1)
        t = per_sketch.mean() / (per_sketch.std() / math.sqrt(n))
        assert t.abs() < 5.0, f"{what} bias: t = {t:.2f} over {n} sketches"
    assert z.abs().max() < 8.0, f"max |z| {z.abs().max():.2f}"


def assert_variance_matches_theory(err, theory, err_gauss, theory_gauss):
    """iid Gaussian rows: the pooled variance equals theory (about +-5% sampling noise for a
    few hundred sketches); orthogonalized rows: not above theory (measured ~0.37x)."""
    ratio_gauss = (err_gauss.var(0).sum() / theory_gauss.sum()).item()
    ratio_orth = (err.var(0).sum() / theory.sum()).item()
    assert 0.85 < ratio_gauss < 1.15, ratio_gauss
    assert ratio_orth < 1.0, ratio_orth
    return ratio_orth, ratio_gauss


@pytest.mark.parametrize("head_size, sketch_dim, outliers", [
    (64, 256, 0), (64, 128, 4), (128, 256, 4), (128, 256, 0)])
def test_qjl_unbiased_and_variance_random(head_size, sketch_dim, outliers):
    projections = 400
    q = torch.randn(12, head_size) * 2
    k = torch.randn(12, head_size) * torch.rand(12, 1) * 3
    k[:3, :2] *= 10  # a few keys with strong channels
    k[3] = q[0]  # <q, k> large: the estimator's constant is checked where it matters most
    err, theory, sketched = qjl_errors(q, k, sketch_dim, outliers, projections)
    assert_unbiased(err, sketched)
    err_g, theory_g, _ = qjl_errors(q, k, sketch_dim, outliers, projections, gaussian=True)
    assert_unbiased(err_g, sketched)
    assert_variance_matches_theory(err, theory, err_g, theory_g)


def test_qjl_constant_against_exact_logits():
    """One big sketch: the estimate converges to <q, k> (not to sqrt(2/pi)^2 = 0.64 of it)."""
    d, m = 64, 8192
    q = torch.randn(d)
    k = q + 0.5 * torch.randn(d)
    codec = QJLKeyCodec(d, m, 0, random.randrange(1 << 30), 0, [0])
    est = codec.scores(codec.prepare_queries(q.view(1, 1, d)), codec.encode(k.view(1, 1, d)))
    exact = (q @ k).item()
    std = math.sqrt(((math.pi / 2) * q.norm() ** 2 * k.norm() ** 2 - exact ** 2) / m)
    assert abs(est.item() - exact) < 5 * std < 0.2 * exact


def test_qjl_outliers_reduce_error_random():
    d, m = 64, 256
    q = torch.randn(16, d)
    k = torch.randn(16, d)
    k[:, [3, 17, 40]] *= 8  # fixed outlier channels, as in real keys
    e0, _, _ = qjl_errors(q, k, m, 0, 200)
    e4, _, _ = qjl_errors(q, k, m, 4, 200)
    assert e4.pow(2).mean() < 0.5 * e0.pow(2).mean()


# ----------------------------------------------------------------------------------------------
# QJL on real keys (SmolLM2-135M through transformers, no vLLM engine)
# ----------------------------------------------------------------------------------------------

CAPTURE_LAYERS = (0, 9, 20, 29)


@pytest.fixture(scope="module")
def real_qk():
    """Post-RoPE queries and keys of a few layers on an essay snippet: {layer: (q, k)} with
    q ``[Hq, T, D]`` and k ``[Hkv, T, D]`` (float32)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    from vllm_kvq.assets import essays_text, smollm2_path

    path = smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    text = essays_text()
    start = random.randrange(0, len(text) - 4000)  # a fresh snippet every run
    ids = tok(text[start:start + 4000], return_tensors="pt").input_ids[:, :256]
    captured = []
    original = modeling_llama.apply_rotary_pos_emb

    def capture(q, k, *args, **kwargs):
        q_out, k_out = original(q, k, *args, **kwargs)
        captured.append((q_out[0].detach(), k_out[0].detach()))
        return q_out, k_out

    modeling_llama.apply_rotary_pos_emb = capture
    try:
        with torch.no_grad():
            model.model(ids)
    finally:
        modeling_llama.apply_rotary_pos_emb = original
    assert len(captured) == model.config.num_hidden_layers
    return {layer: captured[layer] for layer in CAPTURE_LAYERS}


@pytest.mark.real_model
@pytest.mark.parametrize("layer", CAPTURE_LAYERS)
def test_qjl_on_real_keys(real_qk, layer):
    """Bias ~0 and variance vs theory on real (q, k) pairs; outliers lower the error."""
    q, k = real_qk[layer]
    hq, t, d = q.shape
    hkv = k.shape[0]
    assert d == 64 and hq % hkv == 0
    kv_head = random.randrange(hkv)
    q_head = kv_head * (hq // hkv) + random.randrange(hq // hkv)  # a query head of that group
    keys = k[kv_head, torch.randperm(t)[:24]]
    queries = q[q_head, torch.randperm(t)[:24]]
    # Real keys are dominated by a few channels: the motivation for exact outliers.
    top4 = keys.pow(2).topk(4, -1).values.sum(-1) / keys.pow(2).sum(-1)
    assert top4.mean() > 0.2
    projections = 300
    mse = {}
    for outliers in (0, 4):
        err, theory, sketched = qjl_errors(queries, keys, 256, outliers, projections,
                                           layer=layer)
        assert_unbiased(err, sketched)
        err_g, theory_g, _ = qjl_errors(queries, keys, 256, outliers, projections,
                                        gaussian=True)
        assert_unbiased(err_g, sketched)
        ratio_orth, ratio_gauss = assert_variance_matches_theory(err, theory, err_g, theory_g)
        mse[outliers] = err.pow(2).mean().item()
        print(f"layer {layer} outliers {outliers}: mse {mse[outliers]:.2f}, "
              f"var/theory orth {ratio_orth:.2f} gauss {ratio_gauss:.2f}")
    assert mse[4] < 0.85 * mse[0], mse  # measured 0.37-0.55 (sd <= 0.09) by layer


# -- KIVI keys (per-channel groups of tokens) ------------------------------------------------
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 16), (1, 64)])
def test_kivi_groups_round_trip_within_half_a_step(bits, group):
    from vllm_kvq.formats.kivi import KIVIKeyCodec

    codec = KIVIKeyCodec(64, bits, group)
    assert codec.nbytes == storage_format("kivi", bits=bits, group_size=group).nbytes(64)
    x = torch.randn(3, group, 2, 64) * torch.rand(1, 1, 2, 64) * 4  # [NG, G, H, D]
    packed = codec.encode_groups(x)
    assert packed.shape == (3, group, 2, codec.nbytes)
    # Decode as a cache page would be read: [H, N, C] with the groups one after the other.
    x_hat = codec.decode(packed.flatten(0, 1).transpose(0, 1)).transpose(0, 1)
    x_hat = x_hat.unflatten(0, (3, group))
    step = (x.amax(1) - x.amin(1)) / ((1 << bits) - 1)  # [NG, H, D]: per channel and group
    assert ((x_hat - x).abs() <= step.unsqueeze(1) / 2 * 1.01 + 2e-3).all()


def test_kivi_confines_an_outlier_channel_per_token_groups_do_not():
    """Keys have fixed outlier channels (KIVI's motivation): per-channel statistics keep the
    other channels' error unchanged, per-token groups stretch every token's range."""
    from vllm_kvq.formats.kivi import KIVIKeyCodec

    x = torch.randn(1, 32, 1, 64)
    x[..., 5] *= 50
    kivi = KIVIKeyCodec(64, 2, 32)
    k_hat = kivi.decode(kivi.encode_groups(x).flatten(0, 1).transpose(0, 1)).transpose(0, 1)
    per_token = IntGroupCodec(64, 2, 64, False, 0, 0, [0])
    t_hat = per_token.decode(per_token.encode(x[0]))
    others = [c for c in range(64) if c != 5]
    kivi_err = (k_hat[..., others] - x[0][..., others]).pow(2).mean().sqrt()
    token_err = (t_hat[..., others] - x[0][..., others]).pow(2).mean().sqrt()
    assert kivi_err < 0.5 < 5 * kivi_err < token_err


@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_one_bit_codes_store_the_two_centroids(group_size):
    """On Gaussian data, 1-bit centroid levels leave a third of the variance as error, where
    min/max levels would leave ~2-3x the variance; a constant group comes back exactly. KIVI
    1-bit keys (per channel over the group's tokens) likewise."""
    from vllm_kvq.formats.kivi import KIVIKeyCodec

    x = torch.randn(512, 2, 64)
    x[0, 0] = 0.0
    codec = IntGroupCodec(64, 1, group_size, False, 0, 0, [0, 1])
    x_hat = codec.decode(codec.encode(x))
    assert torch.equal(x_hat[0, 0], x[0, 0])
    rel = ((x_hat - x) ** 2).mean() / x.var()
    assert rel < {8: 0.3, 32: 0.36, 64: 0.38}[group_size], rel
    kivi = KIVIKeyCodec(64, 1, 32)
    groups = torch.randn(4, 32, 2, 64)
    packed = kivi.encode_groups(groups).flatten(0, 1).transpose(0, 1)  # [H, N, C]
    k_hat = kivi.decode(packed).transpose(0, 1).unflatten(0, (4, 32))
    assert ((k_hat - groups) ** 2).mean() / groups.var() < 0.4


# ----------------------------------------------------------------------------------------------
# Lloyd-Max codes (one scale per rotated vector)
# ----------------------------------------------------------------------------------------------

# Minimum MSE of b-bit quantizers of a unit Gaussian (Max 1960): Lloyd-Max, and the best
# uniform (equal-step) quantizer. A coordinate of a random direction scaled by sqrt(d) is close
# to N(0, 1) with lighter tails, so the codebook for d must do at least as well as Lloyd-Max
# on the Gaussian (2% for the finite grid), and beat the uniform quantizer.
GAUSS_LLOYD_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
GAUSS_UNIFORM_MSE = {1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("head_size", [64, 128])
def test_lloyd_codebook_is_the_minimum_mse_quantizer(bits, head_size):
    from vllm_kvq.formats.lloyd_max import codebook

    c, edges = (torch.from_numpy(a) for a in codebook(bits, head_size))
    assert c.shape == (1 << bits,) and torch.equal(c, -c.flip(0)) and (c.diff() > 0).all()
    assert torch.allclose(edges, (c[1:] + c[:-1]) / 2)
    u = torch.nn.functional.normalize(torch.randn(20000, head_size), dim=-1) * head_size ** 0.5
    mse = (u - c[torch.bucketize(u, edges)]).pow(2).mean().item()
    assert mse <= GAUSS_LLOYD_MSE[bits] * 1.02
    if bits > 1:
        assert mse < GAUSS_UNIFORM_MSE[bits]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_codec_round_trip(bits):
    from vllm_kvq.formats.lloyd_max import LloydMax, LloydMaxCodec

    d, t, h = 64, 300, 2
    codec = LloydMaxCodec(d, bits, random.randrange(1 << 30), random.randrange(64), [0, 5])
    assert codec.nbytes == LloydMax(bits).nbytes(d) == d * bits // 8 + 2
    x = torch.randn(t, h, d) * torch.rand(t, h, 1) * 5 + torch.randn(d)  # a shared offset
    packed = codec.encode(x)
    assert packed.shape == (t, h, codec.nbytes)
    y = codec.to_codec_domain(x.transpose(0, 1)).transpose(0, 1)
    y_hat = codec.decode(packed)
    rel = ((y_hat - y).pow(2).sum(-1) / y.pow(2).sum(-1)).mean().item()
    assert rel <= GAUSS_LLOYD_MSE[bits] * 1.1  # the least-squares scale only lowers it
    # the stored scale is least squares: the error is orthogonal to the reconstruction
    # (up to the fp16 rounding of the scale)
    cos = (y_hat * (y - y_hat)).sum(-1) / (y_hat.norm(dim=-1) * y.norm(dim=-1))
    assert cos.abs().max() < 2e-3
    # model space: the inverse rotation
    back = codec.finish_output(y_hat.transpose(0, 1)).transpose(0, 1)
    assert torch.allclose(back.norm(dim=-1), y_hat.norm(dim=-1), rtol=1e-4)
