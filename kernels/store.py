"""Quantize and pack the step's new K/V into their slots: one launch for every slot.

Grid: (token tiles of BT, KV heads). Each program encodes BT tokens of one KV head with the
layer's key and value formats (``kernels.formats.store_field``: each format's ``store_*``
piece mirrors its codec's ``encode``) and writes the whole slot (key field, value field,
zero padding). Slots of -1 in ``slot_mapping`` are padding and are
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

from .formats import store_field
from .launch import Launch, launch, store_launch
from .layout import KernelLayout


@triton.jit(do_not_specialize=["n_tokens", "BS"])
def store_kernel(
        k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, slot_ptr, n_tokens,
        u8_ptr, stride_blk, stride_head, BS,
        kmat_ptr, vmat_ptr,
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

    store_field(u8_ptr, base, ok, k_ptr, krow, kmat_ptr, h, 0, K_KIND, K_BITS, K_GROUP, K_CB,
                K_ROT, QJL_M, QJL_O, QJL_OP, RAW_BF16, D, KCC, MC, KC, BT)
    store_field(u8_ptr, base, ok, v_ptr, vrow, vmat_ptr, h, KB, V_KIND, V_BITS, V_GROUP, V_CB,
                V_ROT, 0, 0, 1, RAW_BF16, D, VCC, MC, KC, BT)

    if PADP > 0:  # zero padding up to the slot size (blocks are not zeroed on allocation)
        jp = tl.arange(0, PADP)
        tl.store(u8_ptr + base[:, None] + KB + VB + jp[None, :],
                 tl.zeros([BT, PADP], tl.uint8), mask=ok[:, None] & (jp < SB - KB - VB)[None, :])


def plan_store(key, value, kv_cache, slot_mapping, layout: KernelLayout,
               kmat=None, vmat=None) -> list[Launch]:
    """Pack ``key``/``value`` ``[T, H, D]`` into the slots of ``slot_mapping`` (-1: skipped);
    kmat / vmat: the formats' per-head matrices (``Codec.kernel_matrix``, fp32), if any."""
    n = slot_mapping.shape[0]
    if n == 0:
        return []
    h = kv_cache.shape[1]
    key = key[:n]
    value = value[:n]
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert kv_cache.dtype == torch.uint8 and kv_cache.stride(3) == 1
    assert kv_cache.stride(2) == layout.SB and kv_cache.shape[-1] == layout.SB
    dummy = kv_cache  # never read when the format has no such matrix
    config = store_launch(layout)
    return [launch(store_kernel, (triton.cdiv(n, config[0]["BT"]), h), (
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        slot_mapping, n, kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.shape[2],
        kmat if kmat is not None else dummy, vmat if vmat is not None else dummy), config)]
