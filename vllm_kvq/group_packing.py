"""Packing KIVI key groups when they complete.

A KIVI group is G consecutive tokens of one request (G divides the block size). Its keys can
be quantized only when its last token arrives, which may be steps after the first: the
group's earlier tokens are then taken from the exact recent window (the ring), the later ones
from the step's own keys. The builder plans, once per step, every group that completes in the
step (``plan_groups``); each KIVI layer then packs them (``pack_groups``) before attention (a
prefill query may read the groups its chunk completed, see ``exactness``) and before the
step's keys enter the ring (entering could overwrite ring entries the group still needs).
"""

from dataclasses import dataclass

import torch


@dataclass
class GroupPlan:
    """Every token of every group completing this step, group by group (``[NG * G]``)."""

    group_tokens: int
    step_rows: torch.Tensor  # row of the step's keys holding the token, or -1
    ring_rows: torch.Tensor  # else its row in the flattened ring (slot * R + position % R)
    cache_slots: torch.Tensor  # the token's slot in the paged cache (block * bs + offset)

    @property
    def num_groups(self) -> int:
        return self.cache_slots.numel() // self.group_tokens


def plan_groups(group_tokens: int, ring_size: int, query_start_loc: list[int],
                context_lens: list[int], query_lens: list[int], window_slots: list[int],
                window_exact: list[int], block_table: torch.Tensor,
                block_size: int) -> GroupPlan:
    g = group_tokens
    rows, positions, step_rows, ring_rows = [], [], [], []
    for i, (ctx, new) in enumerate(zip(context_lens, query_lens)):
        open_tokens = ctx % g
        if open_tokens and (window_slots[i] < 0 or window_exact[i] < open_tokens):
            # Cannot happen while every running request holds a slot and starts block-aligned;
            # fail loudly rather than pack a group from tokens that are gone.
            raise RuntimeError(f"KVQ: a KIVI key group of a request at position {ctx} has "
                               f"{open_tokens} tokens outside the exact window "
                               f"({window_exact[i]} held); its keys cannot be packed.")
        first_end = ctx - open_tokens + g  # end of the first group completing in this step
        for end in range(first_end, ctx + new + 1, g):
            for p in range(end - g, end):
                rows.append(i)
                positions.append(p)
                from_step = p >= ctx
                step_rows.append(query_start_loc[i] + p - ctx if from_step else -1)
                ring_rows.append(-1 if from_step else window_slots[i] * ring_size + p % ring_size)
    device = block_table.device

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    pos = tensor(positions)
    blocks = block_table[tensor(rows), pos // block_size].long() if rows else pos
    return GroupPlan(g, tensor(step_rows), tensor(ring_rows),
                     blocks * block_size + pos % block_size)


def pack_groups(plan: GroupPlan, key: torch.Tensor, ring_k: torch.Tensor,
                kv_cache: torch.Tensor, key_codec) -> None:
    """Quantize the completed groups and write their key bytes into their slots."""
    if plan.num_groups == 0:
        return
    from_step = (plan.step_rows >= 0)[:, None, None]
    src = torch.where(from_step, key[plan.step_rows.clamp_min(0)],
                      ring_k.flatten(0, 1)[plan.ring_rows.clamp_min(0)].to(key.dtype))
    groups = src.unflatten(0, (plan.num_groups, plan.group_tokens))  # [NG, G, H, D]
    packed = key_codec.encode_groups(groups).flatten(0, 1)  # [NG * G, H, C_key]
    block_size = kv_cache.shape[2]
    kv_cache[plan.cache_slots // block_size, :, plan.cache_slots % block_size,
             :key_codec.nbytes] = packed
