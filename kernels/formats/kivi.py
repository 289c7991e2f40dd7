"""Kernel pieces of KIVI keys (reference: ``vllm_kvq.formats.kivi``).

``kivi_stats`` / ``kivi_piece`` / ``kivi_key_scores`` <-> ``KIVIKeyCodec.decode`` + scores
(per-channel statistics folded into the query); ``store_kivi`` <-> ``KIVIKeyCodec.encode``
(zeros: a group is packed in torch when it completes, ``vllm_kvq.group_packing``).

KIVI keys (``KIVIKeyCodec``): per-channel codes over groups of G tokens; the group's fp16
scales and mins (4*D bytes: scales of the D channels, then mins) are cut into G pieces of
P = 4*D/G bytes, piece i in slot i of the group. A context tile holds NG = N / G whole
groups (G divides the block size, so a group never spans two blocks), and a group's
statistics fold into the query instead of the keys:
    <q, k_n> = sum_c code[n, c] * (scale[c] * q[c]) + sum_c 1 * (min[c] * q[c])
-- per bit position, a batched dot of the raw codes (exact in fp16) [NG, G, CB] with the
per-group scaled query [NG, CB, MP], and one of ones with the min-weighted query (the
per-group bias, without a cross-thread reduction). Dequantizing the keys instead would need
D scales and mins per token (every thread holding the statistics of all of its channels);
scaling the query touches only the small [NG, CB, MP] operands. The statistics are read
as whole pieces (vector loads), once per tile.
"""

import triton
import triton.language as tl

from vllm_kvq.formats.kivi import KIVI

from ..bits import load_window, unpack

KIND = tl.constexpr(KIVI.kernel_kind)


@triton.jit
def kivi_stats(h_ptr, gslot, gvalid, KOFF: tl.constexpr, P: tl.constexpr, SB: tl.constexpr,
               G: tl.constexpr, D: tl.constexpr, PER: tl.constexpr):
    """fp16 scales and mins of the tile's groups (first slots ``gslot`` ``[NG]``, 0 where
    not ``gvalid``), each ``[NG, D // PER, PER]`` (channel order). The group's scales are the
    pieces of its first G/2 slots, its mins those of the last G/2 (P bytes at slot byte
    KOFF each): whole pieces, read with vector loads. A group read even partly has all of its
    slots packed."""
    i = tl.arange(0, G // 2)
    e = tl.arange(0, P // 2)
    off = (gslot // 2 + KOFF // 2)[:, None, None] + (i * (SB // 2))[None, :, None] \
        + e[None, None, :]
    m = gvalid[:, None, None]
    NG: tl.constexpr = gslot.shape[0]
    sc = tl.load(h_ptr + off, mask=m, other=0.0)  # stream: side
    mn = tl.load(h_ptr + off + G // 2 * (SB // 2), mask=m, other=0.0)  # stream: side
    return (tl.reshape(sc, [NG, D // PER, PER]), tl.reshape(mn, [NG, D // PER, PER]))


@triton.jit
def kivi_piece(codes, sc3, mn3, q, s, sh: tl.constexpr, NG: tl.constexpr, G: tl.constexpr):
    """Bit position ``sh`` (or the whole field): codes fp16 ``[N, C]`` (channels
    j * PER + sh), statistics fp16 ``[NG, C, PER]``, query fp16 ``[C, MP]``. Accumulates the
    scores ``[NG, G, MP]`` (fp32): codes . (scale * q) + min . q. Products of two fp16 values
    are rounded once to fp16, as an fp32 multiply then rounding would be."""
    C: tl.constexpr = codes.shape[1]
    PER: tl.constexpr = sc3.shape[2]
    pick = (tl.arange(0, PER) == sh)[None, None, :]
    sc = tl.sum(tl.where(pick, sc3, 0.0), axis=2).to(tl.float16)  # [NG, C]
    mn = tl.sum(tl.where(pick, mn3, 0.0), axis=2).to(tl.float16)
    s = tl.dot(tl.reshape(codes, [NG, G, C]), sc[:, :, None] * q[None, :, :], acc=s)
    return tl.dot(tl.full([NG, G, C], 1.0, tl.float16), mn[:, :, None] * q[None, :, :], acc=s)


@triton.jit
def kivi_key_scores(u8_ptr, h_ptr, slot, gslot, gvalid, valid, qs, D: tl.constexpr,
                    BITS: tl.constexpr, G: tl.constexpr, CB: tl.constexpr, SPLIT: tl.constexpr,
                    SB: tl.constexpr, N: tl.constexpr):
    """Unscaled <q, k> of N tokens = NG whole KIVI groups (first slots ``gslot`` ``[NG]``,
    groups past the context masked by ``gvalid``): fp32 ``[N, MP]``. Codes are consumed per
    bit position (SPLIT, as for int keys: piece s holds channels j * PER + s and meets query
    piece qs[s]) or unpacked whole (fields under 16 code bytes)."""
    P: tl.constexpr = 4 * D // G
    NG: tl.constexpr = N // G
    LEVELS: tl.constexpr = (1 << BITS) - 1
    MP: tl.constexpr = qs[0].shape[1]
    s = tl.zeros([NG, G, MP], tl.float32)
    if SPLIT:
        PER: tl.constexpr = 8 // BITS
        x = load_window(u8_ptr, slot, valid, 0, CB, 16, 0, N).to(tl.int32)
        sc3, mn3 = kivi_stats(h_ptr, gslot, gvalid, CB, P, SB, G, D, PER)
        for sh in tl.static_range(PER):
            s = kivi_piece(((x >> (sh * BITS)) & LEVELS).to(tl.float16), sc3, mn3, qs[sh], s,
                           sh, NG, G)
    else:
        x = load_window(u8_ptr, slot, valid, 0, CB, 16, 0, N)
        codes = unpack(x, BITS, N, CB).to(tl.float16)  # [N, D], channel order
        sc3, mn3 = kivi_stats(h_ptr, gslot, gvalid, CB, P, SB, G, D, 1)
        s = kivi_piece(codes, sc3, mn3, qs[0], s, 0, NG, G)
    return tl.reshape(s, [N, MP])


@triton.jit
def store_kivi(u8_ptr, base, ok, D: tl.constexpr, K_GROUP: tl.constexpr, K_CB: tl.constexpr,
               BT: tl.constexpr):
    """KIVIKeyCodec.encode: the key field of BT tokens is zeros until its group completes
    and is packed."""
    P: tl.constexpr = 4 * D // K_GROUP
    jc = tl.arange(0, K_CB)
    tl.store(u8_ptr + base[:, None] + jc[None, :], tl.zeros([BT, K_CB], tl.uint8),
             mask=ok[:, None])
    jp = tl.arange(0, P)
    tl.store(u8_ptr + base[:, None] + K_CB + jp[None, :], tl.zeros([BT, P], tl.uint8),
             mask=ok[:, None])
