"""Drop-in Triton versions of ``vllm_kvq.paged_attention``'s three entry points.

``store_slots``, ``decode_attention`` and ``prefill_attention`` take the same arguments and
return the same things as the torch reference, so a caller dispatches by swapping the
function. ``prefill_attention_varlen`` is the batched form (every prefill request of a step
in two launches) the backend should use on GPU.

Per step, the host does only what is O(queries): it rotates queries for rotated int keys
(R q) or projects them for QJL keys (sqrt(pi/2)/m * S q), once per step and not per context
token. Everything that touches the packed cache runs in the kernels.

Exact recent window (``vllm_kvq.window``): the attention entry points take the layer's ring
``ring=(ring_k, ring_v)`` ``[slots, R, H, D]`` with ``window_slots`` / ``window_exact``
``[B]`` per request (the torch reference takes the same keywords): row b reads its packed
context ``[0, context_lens[b])`` from the blocks, then ``window_exact[b]`` exact tokens from
ring slot ``window_slots[b]`` (position p at ring index p % R), then the step's tokens. The
merge kernel reads the ring in place (no gathered copy).

Each entry point has a ``plan_*`` twin returning its launches (``kernels.launch.Launch``)
without running them: the compile report compiles exactly those.
"""

import torch

from .decode import RingWindow, plan_decode
from .launch import Launch, default_num_splits, run
from .layout import KernelLayout, layout_for_codecs
from .prefill import PrefillPlan, plan_prefill, plan_prefill_step
from .store import plan_store


def _matrix(codec, device) -> torch.Tensor | None:
    """The codec's per-head matrix as the kernels read it (fp32, contiguous, on device)."""
    m = codec.kernel_matrix()
    if m is None:
        return None
    if m.device != device or m.dtype != torch.float32 or not m.is_contiguous():
        m = m.to(device=device, dtype=torch.float32).contiguous()
    return m


def prepare_queries(query: torch.Tensor, layout: KernelLayout, key_codec,
                    num_kv_heads: int) -> torch.Tensor | None:
    """fp32 ``[T, Hq, QK]``: the queries the key format scores with (``kernel_queries``: R q
    for rotated int keys, sqrt(pi/2)/m * S q for QJL keys, q for plain int and KIVI keys);
    None for raw keys (the kernel reads the query in the model dtype). When the kernel
    consumes the key bits per bit position (layout.K_SPLIT), columns are shift-major: the
    PER = 8 / bits strided pieces of the query, one after the other."""
    t, hq, d = query.shape
    q = query.float().view(t, num_kv_heads, hq // num_kv_heads, d)
    qp = key_codec.kernel_queries(q)
    if qp is None:
        return None
    qp = qp.reshape(t, hq, -1)
    if layout.K_SPLIT:  # shift-major: column s * CB + j holds channel j * PER + s
        per = 8 // layout.K_BITS
        qp = qp.view(t, hq, layout.K_CB, per).transpose(-1, -2).reshape(t, hq, -1)
    return qp.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def plan_store_slots(key, value, kv_cache, slot_mapping, key_codec,
                     value_codec) -> list[Launch]:
    layout = layout_for_codecs(key_codec, value_codec, key.shape[-1], key.dtype)
    dev = kv_cache.device
    return plan_store(key, value, kv_cache, slot_mapping, layout, kmat=_matrix(key_codec, dev),
                      vmat=_matrix(value_codec, dev))


def store_slots(key, value, kv_cache, slot_mapping, key_codec, value_codec) -> None:
    """Pack ``key``/``value`` ``[T, H, D]`` into the slots of ``slot_mapping`` (-1: skipped)."""
    run(plan_store_slots(key, value, kv_cache, slot_mapping, key_codec, value_codec))


def _as_rows(x, device) -> torch.Tensor:
    """Per-row ints (a tensor, a list or one int) as an int32 device tensor ``[B]``: int32
    offsets keep the kernels' registers (int64 lengths spill some tiles on sm_80; the
    compile report shows it) and a no-op when the builder already made them int32."""
    if torch.is_tensor(x):
        return x.reshape(-1).to(device=device, dtype=torch.int32)
    values = [int(x)] if isinstance(x, int) else [int(v) for v in x]
    return torch.tensor(values, dtype=torch.int32, device=device)


def ring_window(first, device, ring=None, window_slots=None,
                window_exact=None) -> RingWindow | None:
    """The rows' exact window as the kernels read it (None: no window). ``first``: each
    row's packed context length (host ints or a tensor)."""
    if ring is None:
        return None
    if window_slots is None or window_exact is None:
        raise ValueError("ring= needs window_slots= and window_exact=")
    ring_k, ring_v = ring
    return RingWindow(ring_k, ring_v, _as_rows(window_slots, device), _as_rows(first, device),
                      _as_rows(window_exact, device))


def plan_decode_attention(query, key, value, kv_cache, block_table, context_lens, key_codec,
                          value_codec, scale, num_splits: int | None = None, out=None, *,
                          ring=None, window_slots=None, window_exact=None, first_keys=None):
    """``decode_attention``'s launches and the output they fill, not run."""
    b, hq, d = query.shape
    h = kv_cache.shape[1]
    layout = layout_for_codecs(key_codec, value_codec, d, query.dtype)
    if num_splits is None:
        num_splits = default_num_splits(b, h, block_size=kv_cache.shape[2])
    query, key, value = _rows(query), _rows(key), _rows(value)
    context_lens = _as_rows(context_lens, query.device)
    qp = prepare_queries(query, layout, key_codec, h)
    vrot = _matrix(value_codec, query.device) if layout.V_ROT else None
    window = ring_window(context_lens, query.device, ring, window_slots, window_exact)
    first_keys = None if first_keys is None else _as_rows(first_keys, query.device)
    return plan_decode(query, key, value, kv_cache, block_table, context_lens, layout, qp,
                       vrot, scale, num_splits, out=out, window=window, first_keys=first_keys)


def decode_attention(query, key, value, kv_cache, block_table, context_lens, key_codec,
                     value_codec, scale, num_splits: int | None = None, out=None, *,
                     ring=None, window_slots=None, window_exact=None,
                     first_keys=None) -> torch.Tensor:
    """One new token per request: query ``[B, Hq, D]``, key/value ``[B, H, D]``;
    ``context_lens`` packed tokens, then the exact window if given (module docstring);
    ``first_keys`` ``[B]`` (a sliding window): each row's first visible key, earlier blocks
    are not read. Returns ``[B, Hq, D]`` float32 (or fills ``out``)."""
    launches, out = plan_decode_attention(
        query, key, value, kv_cache, block_table, context_lens, key_codec, value_codec, scale,
        num_splits, out, ring=ring, window_slots=window_slots, window_exact=window_exact,
        first_keys=first_keys)
    run(launches)
    return out


def plan_prefill_attention_varlen(query, key, value, kv_cache, block_table, query_start_loc,
                                  context_lens, key_codec, value_codec, scale,
                                  num_splits: int = 1, out=None, *, ring=None,
                                  window_slots=None, window_exact=None, packed_limits=None,
                                  first_keys=None, plan: PrefillPlan | None = None):
    """``prefill_attention_varlen``'s launches and the output they fill, not run."""
    t, hq, d = query.shape
    h = kv_cache.shape[1]
    layout = layout_for_codecs(key_codec, value_codec, d, query.dtype)
    if plan is None:  # a direct call: plan the step here (host lists or tensors)
        plan = plan_prefill_step(_host_ints(query_start_loc), _host_ints(context_lens),
                                 query.device)
    if packed_limits is not None:
        packed_limits = _as_rows(packed_limits, query.device)
    if first_keys is not None:
        first_keys = _as_rows(first_keys, query.device)
    if block_table.dim() == 1:
        block_table = block_table.unsqueeze(0)
    query, key, value = _rows(query), _rows(key), _rows(value)
    has_context = plan.has_context or packed_limits is not None
    qp = prepare_queries(query, layout, key_codec, h) if has_context else None
    vrot = _matrix(value_codec, query.device) if layout.V_ROT else None
    window = ring_window(plan.context_lens, query.device, ring, window_slots, window_exact)
    return plan_prefill(query, key, value, kv_cache, block_table, plan, layout, qp, vrot, scale,
                        num_splits=num_splits, out=out, window=window,
                        packed_limits=packed_limits, first_keys=first_keys)


def _host_ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if torch.is_tensor(x) else x)]


def prefill_attention_varlen(query, key, value, kv_cache, block_table, query_start_loc,
                             context_lens, key_codec, value_codec, scale,
                             num_splits: int = 1, out=None, *, ring=None, window_slots=None,
                             window_exact=None, packed_limits=None, first_keys=None,
                             plan: PrefillPlan | None = None) -> torch.Tensor:
    """Every prefill request of a step at once. query ``[T, Hq, D]``, key/value ``[T, H, D]``;
    request r owns rows ``query_start_loc[r]:query_start_loc[r + 1]`` (host ints), reads
    ``block_table[r]`` and has ``context_lens[r]`` earlier (packed) tokens, followed by its
    exact window if given (module docstring); ``packed_limits`` ``[T]`` (optional): each
    token's L, keys before it read packed (``vllm_kvq.exactness``); ``first_keys`` ``[T]``
    (a sliding window): each token's first visible key, earlier blocks are not read;
    ``plan``: the step's ``PrefillPlan`` (``plan_prefill_step``, made once per step by the
    metadata builder; then this call does no host work and copies nothing to the device).
    Returns ``[T, Hq, D]`` float32 (or fills ``out``)."""
    launches, out = plan_prefill_attention_varlen(
        query, key, value, kv_cache, block_table, query_start_loc, context_lens, key_codec,
        value_codec, scale, num_splits, out, ring=ring, window_slots=window_slots,
        window_exact=window_exact, packed_limits=packed_limits, first_keys=first_keys,
        plan=plan)
    run(launches)
    return out


def prefill_attention(query, key, value, kv_cache, block_row, context_len, key_codec,
                      value_codec, scale, num_splits: int = 1, out=None, *, ring=None,
                      window_slots=None, window_exact=None, packed_limits=None,
                      first_keys=None):
    """One request's chunk of Tq tokens after ``context_len`` packed tokens (and its exact
    window if given: ``window_slots`` / ``window_exact`` of one row), the reference's
    signature. Returns ``[Tq, Hq, D]`` float32."""
    ctx = int(context_len)
    return prefill_attention_varlen(query, key, value, kv_cache, block_row.reshape(1, -1),
                                    [0, query.shape[0]], [ctx], key_codec, value_codec, scale,
                                    num_splits=num_splits, out=out, ring=ring,
                                    window_slots=window_slots, window_exact=window_exact,
                                    packed_limits=packed_limits, first_keys=first_keys)
