"""Quantize and pack the step's new K/V into their slots: one launch for every slot.

Grid: (token tiles of BT, KV heads). Each program encodes BT tokens of one KV head with the
layer's key and value codecs, exactly as ``vllm_kvq.formats`` does, and writes the whole slot
(key field, value field, zero padding). Slots of -1 in ``slot_mapping`` are padding and are
skipped. Arithmetic follows the torch reference operation by operation (IEEE fp32 rotation /
projection, correctly rounded division, round-half-to-even codes, fp16 scales and mins
computed before the codes), so stored bytes match it except where fp32 summation order moves
a value across a rounding boundary.
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
               CC: tl.constexpr, BT: tl.constexpr):
    """IntGroupCodec.encode of BT tokens, CC channels (a multiple of GROUP) at a time."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = CC // GROUP
    GR: tl.constexpr = D // GROUP
    CB: tl.constexpr = D * BITS // 8
    d = tl.arange(0, D)
    cc = tl.arange(0, CC)
    gi = tl.arange(0, NG)
    if ROT:
        x = tl.load(x_ptr + xrow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        x = x.to(tl.float32)
    for c in tl.static_range(D // CC):
        if ROT:  # (R x)_i = sum_j R[i, j] x_j for the CC rows i of this chunk
            rt = tl.load(rot_ptr + h.to(tl.int64) * D * D + (c * CC + cc)[None, :] * D
                         + d[:, None])  # [D, CC] = R[chunk, :]^T
            y = tl.dot(x, rt, input_precision="ieee")
        else:
            y = tl.load(x_ptr + xrow[:, None] + (c * CC + cc)[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
        g = tl.reshape(y, [BT, NG, GROUP])
        lo = tl.min(g, axis=2)
        hi = tl.max(g, axis=2)
        scale16 = tl.div_rn(hi - lo, tl.full([BT, NG], LEVELS, tl.float32)).to(tl.float16)
        lo16 = lo.to(tl.float16)
        safe = tl.where(scale16 == 0, 1.0, scale16.to(tl.float32))
        q = tl.div_rn(g - lo16.to(tl.float32)[:, :, None], safe[:, :, None])
        codes = tl.minimum(tl.maximum(rint(q), 0.0), LEVELS * 1.0).to(tl.int32)
        packed = pack(tl.reshape(codes, [BT, CC]), BITS, BT, CC)
        jb = tl.arange(0, CC * BITS // 8)
        tl.store(u8_ptr + base[:, None] + OFF + c * (CC * BITS // 8) + jb[None, :], packed,
                 mask=ok[:, None])
        so = base[:, None] + OFF + CB + 2 * (c * NG + gi)[None, :]
        store_f16_bytes(u8_ptr, so, scale16.to(tl.float32), ok[:, None])
        store_f16_bytes(u8_ptr, so + 2 * GR, lo16.to(tl.float32), ok[:, None])


@triton.jit
def _store_qjl(u8_ptr, base, ok, x, proj_ptr, h, M: tl.constexpr, O: tl.constexpr,
               D: tl.constexpr, MC: tl.constexpr, BT: tl.constexpr):
    """QJLKeyCodec.encode: outliers (top-O |k|, ascending index), norm, sign bits."""
    d = tl.arange(0, D)
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
        x = tl.where(sel != 0, 0.0, x)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    store_f16_bytes(u8_ptr, base + M // 8, norm, ok)
    mc = tl.arange(0, MC)
    for c in tl.static_range(M // MC):
        st = tl.load(proj_ptr + h.to(tl.int64) * M * D + (c * MC + mc)[None, :] * D
                     + d[:, None])  # [D, MC] = S[chunk, :]^T
        sk = tl.dot(x, st, input_precision="ieee")
        bits = pack((sk >= 0).to(tl.int32), 1, BT, MC)
        jb = tl.arange(0, MC // 8)
        tl.store(u8_ptr + base[:, None] + c * (MC // 8) + jb[None, :], bits, mask=ok[:, None])


@triton.jit
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
        VB: tl.constexpr, PADP: tl.constexpr, KCC: tl.constexpr, VCC: tl.constexpr,
        MC: tl.constexpr, BT: tl.constexpr):
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
                   KCC, BT)
    else:
        x = tl.load(k_ptr + krow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        _store_qjl(u8_ptr, base, ok, x.to(tl.float32), kproj_ptr, h, QJL_M, QJL_O, D, MC, BT)

    if V_KIND == 0:
        x = tl.load(v_ptr + vrow[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        _store_raw(u8_ptr, base, ok, x, KB, D, BT, RAW_BF16)
    else:
        _store_int(u8_ptr, base, ok, v_ptr, vrow, vrot_ptr, h, KB, V_BITS, V_GROUP, V_ROT, D,
                   VCC, BT)

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
    ce, warps, stages = store_launch(layout)
    grid = (triton.cdiv(n, ce["BT"]), h)
    store_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        slot_mapping, n, kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.shape[2],
        krot if krot is not None else dummy, kproj if kproj is not None else dummy,
        vrot if vrot is not None else dummy, num_warps=warps, num_stages=stages, **ce)
