"""Exact recent window: the last R context tokens of every running request are read in full
precision; older tokens are read from the packed blocks.

The packed blocks stay the single source of truth -- every token is packed when it is
written, whatever the window holds -- so prefix caching, preemption and recompute never
depend on the window; it only makes the most recent context exact. Stored block bytes never
depend on per-request state.

Where the exact K/V live: a per-layer ring ``[num_slots, R, H, D]`` in the model dtype, one
slot per running request (``num_slots`` = ``max_num_seqs``), allocated once when the layer
first runs (the memory-profiling pass), so the profiler sees it. Position p of a request sits
at ring index ``p % R`` of the request's slot.

Which slot a request owns is host bookkeeping (``RecentWindows``), planned once per step from
the batch's request ids (published by ``patches.request_identity``) and shared by every
layer. A slot remembers the contiguous positions ``[start, end)`` it holds; a request whose
step does not continue exactly where its slot ends (first step, resumed after preemption,
prefix-cache hit) starts over with an empty window, so stale K/V are never read. A request
gives its slot back when it finishes or is preempted (the runner's scheduler output says
which); a running request that merely skips a step keeps it.

Speculative decoding: a step may write draft tokens that the verifier then rejects. The next
step resumes at the first rejected position, so the slot rolls back to it (``plan``): the
rejected tokens' ring entries are never read, and the next step overwrites them. So that
rolling back never shortens the exact window, the ring holds R + S positions (S = the
speculative tokens per step, ``ring_capacity``): writing a step's at most S + 1 tokens then
only overwrites positions more than R before the next step's first one. A query therefore
reads the same exact tokens whether its context arrived by accepted drafts or one token at a
time.
"""

from dataclasses import dataclass

import torch


@dataclass
class _Held:
    slot: int
    start: int  # first position held exactly
    end: int  # one past the last position written
    seen: int = 0  # last step that scheduled the request


@dataclass(frozen=True)
class WindowPlan:
    """Per request row of a step: its slot (-1: none) and how many context tokens just
    before the step's first new token are exact (read from the ring, not the blocks)."""

    slots: list[int]
    exact: list[int]


def speculative_tokens(vllm_config) -> int:
    """Draft tokens a request may add per step (0 without speculative decoding)."""
    spec = getattr(vllm_config, "speculative_config", None)
    return int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 0


def ring_capacity(window: int, speculative_tokens: int) -> int:
    """Positions each ring slot holds: the exact window plus one step's draft tokens."""
    return window + speculative_tokens if window else 0


class RecentWindows:
    """Slot ownership and held positions of every running request (host side)."""

    def __init__(self, num_slots: int, size: int, capacity: int | None = None):
        self.size = size  # exact tokens a query may read (R)
        self.capacity = capacity or size  # positions a slot holds (ring_capacity)
        self.free = list(range(num_slots - 1, -1, -1))
        self.held: dict[str, _Held] = {}
        self._last: tuple[int, WindowPlan] | None = None

    def plan(self, step: int, req_ids: list[str], context_lens: list[int],
             query_lens: list[int]) -> WindowPlan:
        """Advance the bookkeeping by one step. Every layer group's builder calls this with
        the same step number; only the first call advances, later ones get the same plan."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        slots, exact = [], []
        for req, ctx, new in zip(req_ids, context_lens, query_lens):
            held = self.held.get(req)
            if held is None:
                slot = self._take_slot(step, req_ids)
                held = self.held[req] = _Held(slot, ctx, ctx) if slot >= 0 else None
            if held is None:  # more running requests than slots: reads packed only
                slots.append(-1)
                exact.append(0)
                continue
            if held.start <= ctx < held.end:  # rejected draft tokens: roll back to ctx
                held.end = ctx
            elif held.end != ctx:  # not a continuation: nothing held is usable
                held.start = held.end = ctx
            held.seen = step
            slots.append(held.slot)
            exact.append(min(self.size, held.end - held.start))
            held.end = ctx + new
            held.start = max(held.start, held.end - self.capacity)
        plan = WindowPlan(slots, exact)
        self._last = (step, plan)
        return plan

    def release(self, req_ids) -> None:
        """Finished or preempted requests give their slots back."""
        for req in req_ids:
            held = self.held.pop(req, None)
            if held is not None:
                self.free.append(held.slot)

    def _take_slot(self, step: int, batch: list[str]) -> int:
        if self.free:
            return self.free.pop()
        # Only if a release was missed: reclaim the longest-unscheduled request's slot.
        idle = [r for r in self.held if r not in batch]
        if not idle:
            return -1
        return self.held.pop(min(idle, key=lambda r: self.held[r].seen)).slot


# -- the step's request identity, published by patches.request_identity ---------------------
_batch: tuple[int, list[str] | None] = (0, None)
_windows: RecentWindows | None = None


def publish_batch(req_ids: list[str] | None) -> None:
    """Called by the model runner before it builds attention metadata: the request id of
    every row, or None for dummy/profiling batches (which must not touch any window)."""
    global _batch
    _batch = (_batch[0] + 1, None if req_ids is None else list(req_ids))


def current_batch() -> tuple[int, list[str] | None]:
    return _batch


def release_requests(req_ids) -> None:
    """Called by the model runner with the requests that finished or were preempted."""
    if _windows is not None:
        _windows.release(req_ids)


def process_windows(num_slots: int, size: int, capacity: int) -> RecentWindows:
    """The process's bookkeeping (one engine per worker process)."""
    global _windows
    if _windows is None or (_windows.size, _windows.capacity) != (size, capacity):
        _windows = RecentWindows(num_slots, size, capacity)
    return _windows


def ring_slots(max_num_seqs: int) -> int:
    """Slots of a layer's ring: one per running request, and a spare one that takes the
    writes of the step's tokens the ring does not keep (``write_ring``)."""
    return max_num_seqs + 1


def window_ring_bytes(capacity: int, max_num_seqs: int, num_layers: int, num_kv_heads: int,
                      head_size: int, itemsize: int) -> int:
    """Memory of every layer's K and V rings (``capacity`` positions per slot): counted in
    every capacity figure."""
    return (2 * capacity * ring_slots(max_num_seqs) * num_layers * num_kv_heads * head_size
            * itemsize)


# -- device side: the per-layer ring --------------------------------------------------------
@dataclass
class RecentKV:
    """Exact K/V gathered for a batch of rows: ``[B, H, W, D]`` each, ``lens`` ``[B]``."""

    keys: torch.Tensor
    values: torch.Tensor
    lens: torch.Tensor

    def visible(self) -> torch.Tensor:
        """``[B, W]``: which gathered entries are real."""
        w = torch.arange(self.keys.shape[2], device=self.keys.device)
        return w.unsqueeze(0) < self.lens.unsqueeze(1)

    def row(self, r: int) -> "RecentKV":
        return RecentKV(self.keys[r:r + 1], self.values[r:r + 1], self.lens[r:r + 1])


def write_ring(ring_k: torch.Tensor, ring_v: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, token_slots: torch.Tensor,
               token_positions: torch.Tensor) -> None:
    """Copy the step's K/V ``[T, H, D]`` into the ring, token t at ring index
    ``token_positions[t] % R`` of slot ``token_slots[t]``. Tokens the ring does not keep
    (slot -1) land in the spare last slot (``ring_slots``), which no request owns, so the
    copy needs no mask and no host sync; the builder keeps only the last ring-capacity new
    tokens of each request, so no owned index repeats."""
    n = token_slots.shape[0]
    ring_idx = token_positions % ring_k.shape[1]
    ring_k[token_slots, ring_idx] = key[:n].to(ring_k.dtype)
    ring_v[token_slots, ring_idx] = value[:n].to(ring_v.dtype)


def gather_ring(ring_k: torch.Tensor, ring_v: torch.Tensor, slots: torch.Tensor,
                first: torch.Tensor, exact: torch.Tensor) -> RecentKV:
    """The exact tokens ``[first, first + exact)`` of each row (``first`` = the tokens read
    packed), oldest first. The copy is at most R tokens per row (bounded scratch)."""
    size = ring_k.shape[1]
    width = max(1, int(exact.max())) if exact.numel() else 1
    offsets = torch.arange(width, device=ring_k.device)
    positions = first.to(ring_k.device).unsqueeze(1) + offsets  # [B, W]
    rows = slots.clamp_min(0).unsqueeze(1)
    keys = ring_k[rows, positions % size]  # [B, W, H, D]
    values = ring_v[rows, positions % size]
    return RecentKV(keys.transpose(1, 2), values.transpose(1, 2), exact)
