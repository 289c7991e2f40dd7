"""Comparing a packed field the store kernel wrote with the one the torch reference wrote.

Raw fields and non-rotated int fields must be byte-identical: the kernel does the reference's
operations in the same order on the same fp32 inputs (min/max, correctly rounded division,
RTNE fp16 casts, round-half-to-even codes).

Rotated int fields and QJL sign bits start from a product (R x, S k) whose fp32 summation order
differs from the reference's, so an entry sitting at a rounding boundary can land on the
neighbouring value: an fp16 scale/min one ulp away, a code one level away, a sign bit whose
projection is ~0. Measured over 512-token x 3-head draws of every format at D 64/128/256, bf16
and fp16 (2026-11-29; `python -m tests.kernels.tolerance_survey` repeats it): at most 6e-5 of
scale/min entries and 1e-6 of codes slipped. A test draw holds at most ~4k such entries, so the
expected number of slips is < 0.25 and more than ``FP_ORDER_SLIPS`` = 8 has Poisson probability
< 1e-10, while a systematic mistake (a rounding mode, a wrong group, a wrong rotation) changes
a large share of entries. So: each slip at most one ulp / one level, and at most 8 slips or
0.1% of entries.

Two input conditions make the stored value itself ill-defined, not just its last bit; the
tests redraw such inputs before storing, so every stored row is checked:
- QJL outliers are the top-o |k|; topk may break a tie between the o-th and (o+1)-th either
  way (8% of bf16 D=256 rows tie with 4 outliers).
- 1-bit codes store two centroids, the means of the elements below and above the group's
  midpoint; an element within rounding of the midpoint may fall on either side, which moves a
  centroid by many ulps (seen: 47).
"""

import torch

from vllm_kvq.formats import bits as bitpack
from vllm_kvq.formats.int_group import IntGroupCodec
from vllm_kvq.formats.qjl import QJLKeyCodec
from vllm_kvq.formats.raw import RawCodec

FP_ORDER_SLIPS = 8


def f16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp16 ulps of two uint8 tensors holding fp16 bytes (same sign assumed).
    Copied first: a field may start at an odd byte, which an int16 view cannot."""
    ia, ib = (x.clone(memory_format=torch.contiguous_format).view(torch.int16).int()
              for x in (a, b))
    return (ia - ib).abs()


def assert_rare(differs: torch.Tensor, what: str) -> None:
    count, allowed = int(differs.sum()), max(FP_ORDER_SLIPS, differs.numel() // 1000)
    assert count <= allowed, f"{what}: {count} of {differs.numel()} differ (allowed {allowed})"


def check_int_field(codec: IntGroupCodec, got: torch.Tensor, want: torch.Tensor, what: str):
    """``got``/``want``: [rows, field bytes] of the slots the draw wrote (may be none)."""
    if codec.rot is None or not len(got):
        assert torch.equal(got, want), f"{what}: non-rotated int field differs"
        return
    cb, gb = codec.code_bytes, 2 * codec.groups
    ulps = f16_ulps(got[:, cb:cb + 2 * gb], want[:, cb:cb + 2 * gb])
    assert ulps.max() <= 1, f"{what}: scale/min off by {ulps.max()} fp16 ulps"
    assert_rare(ulps > 0, f"{what}: scales/mins")
    levels = (bitpack.unpack(got[:, :cb], codec.bits).int()
              - bitpack.unpack(want[:, :cb], codec.bits).int()).abs()
    assert levels.max() <= 1, f"{what}: codes off by {levels.max()} levels"
    assert_rare(levels > 0, f"{what}: codes")


def check_field(codec, got, want, what: str, keys: torch.Tensor | None = None):
    """One packed field of ``codec`` (``[rows, field bytes]``) against the reference's;
    ``keys``: the QJL rows stored, to rule out outlier ties."""
    if isinstance(codec, RawCodec):
        assert torch.equal(got, want), f"{what}: raw field differs"
    elif isinstance(codec, IntGroupCodec):
        check_int_field(codec, got, want, what)
    else:
        check_qjl_field(codec, got, want, keys, what)


def check_qjl_field(codec: QJLKeyCodec, got, want, keys: torch.Tensor | None, what: str):
    o, sb = codec.outliers, codec.sign_bytes
    if o and keys is not None:
        assert not outlier_tie(keys, o).any(), f"{what}: test input has outlier ties"
    signs_differ = bitpack.unpack(got[:, :sb], 1) != bitpack.unpack(want[:, :sb], 1)
    assert_rare(signs_differ, f"{what}: sign bits")
    assert f16_ulps(got[:, sb:sb + 2], want[:, sb:sb + 2]).max() <= 1, f"{what}: norm"
    assert torch.equal(got[:, sb + 2:], want[:, sb + 2:]), f"{what}: outliers differ"


def outlier_tie(keys: torch.Tensor, outliers: int) -> torch.Tensor:
    """Rows (any leading shape) whose o-th and (o+1)-th largest |k| are equal."""
    top = keys.float().abs().sort(-1, descending=True).values
    return top[..., outliers - 1] == top[..., outliers]


def centroid_tie(x: torch.Tensor, codec: IntGroupCodec) -> torch.Tensor:
    """[T, H] rows of which some rotated element lies within 1e-5 of its group's range from
    the group's midpoint (fp32 rounding is ~1e-7 of it): the 1-bit split is ambiguous there."""
    y = torch.einsum("hij,thj->thi", codec.rot.double(), x.double())
    g = y.unflatten(-1, (codec.groups, codec.group_size))
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    return ((g - (lo + hi) / 2).abs() <= 1e-5 * (hi - lo)).flatten(-2).any(-1)


def ambiguous_rows(x: torch.Tensor, codec) -> torch.Tensor | None:
    """[T, H] rows of ``x`` whose stored value ``codec`` leaves ambiguous (None: it never does)."""
    if isinstance(codec, QJLKeyCodec) and codec.outliers:
        return outlier_tie(x, codec.outliers)
    if isinstance(codec, IntGroupCodec) and codec.bits == 1 and codec.rot is not None:
        return centroid_tie(x, codec)
    return None


def redraw_ambiguous_rows(x: torch.Tensor, codec) -> None:
    """Redraw, in place, the [T, H, D] rows whose stored value the format leaves ambiguous."""
    while (rows := ambiguous_rows(x, codec)) is not None and rows.any():
        x[rows] = (torch.randn(int(rows.sum()), x.shape[-1]) * x.float().std()).to(x.dtype)
