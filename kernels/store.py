"""Quantize and pack the step's new K/V into their slots: one launch for every slot.

Grid: (token tiles of BT, KV heads). Each program encodes BT tokens of one KV head with the
layer's key and value codecs, exactly as ``vllm_kvq.formats`` does, and writes the whole slot
(key field, value field, zero padding). Slots of -1 in ``slot_mapping`` are padding and are
skipped. KIVI keys are written as zeros, as ``KIVIKeyCodec.encode`` does: a key group is
quantized only when it completes, by ``vllm_kvq.group_packing.pack_groups`` (torch, after
attention), which overwrites them. Arithmetic follows the torch reference operation by
operation (rotation and projection as tf32x3 tensor-core dots, accurate to about fp32;
correctly rounded division, round-half-to-even codes, fp16 scales and mins computed before
the codes), so stored bytes match it except where summation order moves a value across a
rounding boundary.
"""

import torch
import triton
import triton.language as tl

from .codecs import pack, rint, store_f16_bytes
from .layout import KernelLayout, store_launch


@triton.jit
def _store_raw(u8_ptr, base, ok, x, OFF: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
               RAW_BF16: tl.constexpr):
    if RAW_BF16:
        bits = x.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        bits = x.to(tl.float16).to(tl.int16, bitcast=True)
    bits = bits.to(tl.int32) & 0xFFFF
    b = tl.reshape(tl.join(bits & 255, bits >> 8), [BT, 2 * D]).to(tl.uint8)
    j = tl.arange(0, 2 * D)
    tl.store(u8_ptr + base[:, None] + OFF + j[None, :], b, mask=ok[:, None])


@triton.jit
def _store_int(u8_ptr, base, ok, x_ptr, xrow, rot_ptr, h, OFF: tl.constexpr,
               BITS: tl.constexpr, GROUP: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
               CC: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr):
    """IntGroupCodec.encode of BT tokens, CC channels (a multiple of GROUP) at a time. The
    rotation R x is accumulated over KC-channel slices of x (tf32x3 tensor-core dots, ~fp32
    accurate), so no operand ever holds a whole head."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = CC // GROUP
    GR: tl.constexpr = D // GROUP
    CB: tl.constexpr = D * BITS // 8
    cc = tl.arange(0, CC)
    kk = tl.arange(0, KC)
    gi = tl.arange(0, NG)
    jb = tl.arange(0, CC * BITS // 8)
    for c in range(D // CC):
        if ROT:  # (R x)_i = sum_j R[i, j] x_j for the CC rows i of this chunk
            y = tl.zeros([BT, CC], tl.float32)
            for k0 in range(0, D, KC):
                xk = tl.load(x_ptr + xrow[:, None] + (k0 + kk)[None, :], mask=ok[:, None],
                             other=0.0).to(tl.float32)
                rt = tl.load(rot_ptr + h.to(tl.int64) * D * D + (c * CC + cc)[None, :] * D
                             + (k0 + kk)[:, None])  # [KC, CC] = R[chunk, k-slice]^T
                y += tl.dot(xk, rt, input_precision="tf32x3")
        else:
            y = tl.load(x_ptr + xrow[:, None] + (c * CC + cc)[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
        g = tl.reshape(y, [BT, NG, GROUP])
        lo = tl.min(g, axis=2)
        hi = tl.max(g, axis=2)
        if BITS == 1:  # the two centroids (IntGroupCodec.encode / two_level_centroids)
            up = g > ((lo + hi) * 0.5)[:, :, None]
            n_up = tl.sum(up.to(tl.float32), axis=2)
            low = tl.div_rn(tl.sum(tl.where(up, 0.0, g), axis=2),
                            tl.maximum(GROUP - n_up, 1.0))
            hi = tl.where(n_up > 0, tl.div_rn(tl.sum(tl.where(up, g, 0.0), axis=2),
                                              tl.maximum(n_up, 1.0)), low)
            lo = low
        scale16 = tl.div_rn(hi - lo, tl.full([BT, NG], LEVELS, tl.float32)).to(tl.float16)
        lo16 = lo.to(tl.float16)
        safe = tl.where(scale16 == 0, 1.0, scale16.to(tl.float32))
        q = tl.div_rn(g - lo16.to(tl.float32)[:, :, None], safe[:, :, None])
        codes = tl.minimum(tl.maximum(rint(q), 0.0), LEVELS * 1.0).to(tl.int32)
        packed = pack(tl.reshape(codes, [BT, CC]), BITS, BT, CC)
        tl.store(u8_ptr + base[:, None] + OFF + c * (CC * BITS // 8) + jb[None, :], packed,
                 mask=ok[:, None])
        so = base[:, None] + OFF + CB + 2 * (c * NG + gi)[None, :]
        store_f16_bytes(u8_ptr, so, scale16.to(tl.float32), ok[:, None])
        store_f16_bytes(u8_ptr, so + 2 * GR, lo16.to(tl.float32), ok[:, None])


@triton.jit
def _store_qjl(u8_ptr, base, ok, x_ptr, xrow, proj_ptr, h, M: tl.constexpr, O: tl.constexpr,
               OP: tl.constexpr, D: tl.constexpr, MC: tl.constexpr, KC: tl.constexpr,
               BT: tl.constexpr):
    """QJLKeyCodec.encode: outliers (top-O |k|, ascending index), norm, sign bits. The sketch
    S k_in is accumulated over KC-channel slices of k (tf32x3 dots) with the outlier channels
    zeroed slice by slice."""
    d = tl.arange(0, D)
    x = tl.load(x_ptr + xrow[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    jo = tl.arange(0, OP)
    out_idx = tl.full([BT, OP], -1, tl.int32)  # outlier channels, ascending; -1 = none
    if O > 0:
        a = tl.abs(x)
        sel = tl.zeros([BT, D], tl.int32)
        for _ in tl.static_range(O):
            am = tl.where(sel != 0, -1.0, a)
            top = tl.argmax(am, axis=1)
            sel = tl.where(d[None, :] == top[:, None], 1, sel)
        rank = tl.cumsum(sel, axis=1) - 1
        smask = ok[:, None] & (sel != 0)
        idx_b = tl.broadcast_to(d[None, :], [BT, D]).to(tl.uint8)
        tl.store(u8_ptr + base[:, None] + M // 8 + 2 + 2 * O + rank, idx_b, mask=smask)
        store_f16_bytes(u8_ptr, base[:, None] + M // 8 + 2 + 2 * rank, x, smask)
        for k in tl.static_range(O):
            hit = (sel != 0) & (rank == k)
            idx_k = tl.max(tl.where(hit, d[None, :], -1), axis=1)
            out_idx = tl.where(jo[None, :] == k, idx_k[:, None], out_idx)
        x = tl.where(sel != 0, 0.0, x)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    store_f16_bytes(u8_ptr, base + M // 8, norm, ok)
    mc = tl.arange(0, MC)
    kk = tl.arange(0, KC)
    jb = tl.arange(0, MC // 8)
    for c in range(M // MC):
        sk = tl.zeros([BT, MC], tl.float32)
        for k0 in range(0, D, KC):
            xk = tl.load(x_ptr + xrow[:, None] + (k0 + kk)[None, :], mask=ok[:, None],
                         other=0.0).to(tl.float32)
            is_out = tl.max((out_idx[:, :, None] == (k0 + kk)[None, None, :]).to(tl.int32),
                            axis=1)
            xk = tl.where(is_out != 0, 0.0, xk)
            st = tl.load(proj_ptr + h.to(tl.int64) * M * D + (c * MC + mc)[None, :] * D
                         + (k0 + kk)[:, None])  # [KC, MC] = S[chunk, k-slice]^T
            sk += tl.dot(xk, st, input_precision="tf32x3")
        bits = pack((sk >= 0).to(tl.int32), 1, BT, MC)
        tl.store(u8_ptr + base[:, None] + c * (MC // 8) + jb[None, :], bits, mask=ok[:, None])


@triton.jit(do_not_specialize=["n_tokens", "BS"])
def store_kernel(
        k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, slot_ptr, n_tokens,
        u8_ptr, stride_blk, stride_head, BS,
        krot_ptr, kproj_ptr, vrot_ptr,
        D: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr, RAW_BF16: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
        K_CB: tl.constexpr, K_ROT: tl.constexpr, QJL_M: tl.constexpr, QJL_O: tl.constexpr,
        QJL_OP: tl.constexpr, V_KIND: tl.constexpr, V_BITS: tl.constexpr,
        V_GROUP: tl.constexpr, V_CB: tl.constexpr, V_ROT: tl.constexpr,
        V_CHUNK: tl.constexpr, V_A: tl.constexpr, V_DELTA: tl.constexpr, V_C0: tl.constexpr,
        K_SPLIT: tl.constexpr, VB: tl.constexpr, PADP: tl.constexpr, KCC: tl.constexpr,
        VCC: tl.constexpr, MC: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    t = pid * BT + tl.arange(0, BT)
    tm = t < n_tokens
    slot = tl.load(slot_ptr + t, mask=tm, other=-1).to(tl.int64)
    ok = tm & (slot >= 0)
    slot = tl.where(ok, slot, 0)
    blk = slot // BS
    base = blk * stride_blk + h * stride_head + (slot - blk * BS) * SB
    t64 = t.to(tl.int64)
    krow = t64 * sk_t + h * sk_h
    vrow = t64 * sv_t + h * sv_h
    d = tl.arange(0, D)

    if K_KIND == 0:
        x = tl.load(k_ptr + krow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        _store_raw(u8_ptr, base, ok, x, 0, D, BT, RAW_BF16)
    elif K_KIND == 1:
        _store_int(u8_ptr, base, ok, k_ptr, krow, krot_ptr, h, 0, K_BITS, K_GROUP, K_ROT, D,
                   KCC, KC, BT)
    elif K_KIND == 2:
        _store_qjl(u8_ptr, base, ok, k_ptr, krow, kproj_ptr, h, QJL_M, QJL_O, QJL_OP, D, MC, KC,
                   BT)
    else:  # KIVI: zeros until the group completes and is packed (KIVIKeyCodec.encode)
        P: tl.constexpr = 4 * D // K_GROUP
        jc = tl.arange(0, K_CB)
        tl.store(u8_ptr + base[:, None] + jc[None, :], tl.zeros([BT, K_CB], tl.uint8),
                 mask=ok[:, None])
        jp = tl.arange(0, P)
        tl.store(u8_ptr + base[:, None] + K_CB + jp[None, :], tl.zeros([BT, P], tl.uint8),
                 mask=ok[:, None])

    if V_KIND == 0:
        x = tl.load(v_ptr + vrow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        _store_raw(u8_ptr, base, ok, x, KB, D, BT, RAW_BF16)
    else:
        _store_int(u8_ptr, base, ok, v_ptr, vrow, vrot_ptr, h, KB, V_BITS, V_GROUP, V_ROT, D,
                   VCC, KC, BT)

    if PADP > 0:  # zero padding up to the slot size (blocks are not zeroed on allocation)
        jp = tl.arange(0, PADP)
        tl.store(u8_ptr + base[:, None] + KB + VB + jp[None, :],
                 tl.zeros([BT, PADP], tl.uint8), mask=ok[:, None] & (jp < SB - KB - VB)[None, :])


def launch_store(key, value, kv_cache, slot_mapping, layout: KernelLayout,
                 krot=None, kproj=None, vrot=None) -> None:
    n = slot_mapping.shape[0]
    if n == 0:
        return
    h = kv_cache.shape[1]
    key = key[:n]
    value = value[:n]
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert kv_cache.dtype == torch.uint8 and kv_cache.stride(3) == 1
    assert kv_cache.stride(2) == layout.SB and kv_cache.shape[-1] == layout.SB
    dummy = kv_cache  # never read when the codec has no such matrix
    ce, warps, stages, maxnreg = store_launch(layout)
    grid = (triton.cdiv(n, ce["BT"]), h)
    store_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        slot_mapping, n, kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.shape[2],
        krot if krot is not None else dummy, kproj if kproj is not None else dummy,
        vrot if vrot is not None else dummy, num_warps=warps, num_stages=stages,
        maxnreg=maxnreg, **ce)
