"""KIVI keys in the Triton kernels vs the torch reference.

KIVI keys are per-channel codes over groups of G tokens whose statistics are spread over the
group's slots (``formats.kivi``). The store writes zeros for a token's key field (as
``KIVIKeyCodec.encode`` does); a group is packed in torch when it completes
(``group_packing.pack_groups``). The context is built the way the backend builds it: every
token of a row's ``n`` context tokens is stored, the ``n // G`` completed groups are packed,
and the row reads ``packed`` tokens from the blocks and the other ``n - packed`` from the
exact window (the ring), where ``n - packed`` covers at least the open group's tokens
(``n % G``) -- so the packed context ends on a group boundary or, when the window holds more
than the open group, inside a completed group (whose statistics the kernel must still read
from all of its slots). Without a window the packed context is any prefix of the completed
groups. Caches start as random bytes and ring entries no row may read hold large junk, as in
test_window.py; tolerances as in test_decode.py.
"""

import random

import pytest
import torch

from vllm_kvq import paged_attention as ref
from vllm_kvq.config import WINDOWED_PRESETS
from vllm_kvq.formats import LayerFormat, build_codecs, storage_format
from vllm_kvq.formats.int_group import IntGroupCodec
from vllm_kvq.group_packing import GroupPlan, pack_groups
from vllm_kvq.kernels import api

from .field_checks import check_int_field, redraw_ambiguous_rows
from .helpers import check_attention, junk_cache, random_block_tables, random_query_lens

# The shipped presets, plus rarer paths: 1-bit codes (code field under 16 bytes at D=64: the
# whole-field path), 16- and 64-token groups, 8-bit codes, raw and rotated values.
FORMATS = {
    **WINDOWED_PRESETS,
    "kivi1g16_raw": LayerFormat(storage_format("kivi", bits=1, group_size=16), storage_format("raw")),
    "kivi8g64_v4g32r": LayerFormat(storage_format("kivi", bits=8, group_size=64),
                                   storage_format("int", 4, 32, True)),
}
NAMES = list(FORMATS)


def _codecs(name, head_size, h, dtype):
    fmt = FORMATS[name]
    heads = random.sample(range(64), h)
    kc, vc = build_codecs(fmt, head_size, dtype, random.randrange(1 << 16), random.randrange(64),
                          heads)
    return fmt, kc, vc


def _keys(n, h, d, dtype):
    """Keys with per-channel structure (scales and offsets), as KIVI expects."""
    chan_scale = torch.rand(h, d) * 2.5 + 0.5
    chan_shift = torch.randn(h, d)
    return (torch.randn(n, h, d) * chan_scale + chan_shift).to(dtype)


def _context(name, head_size, h, batch, dtype, window, max_context=150):
    """Cache, block table, codecs and each row's (n, keys, values): every token stored, the
    completed groups packed (as the backend's group pass does)."""
    fmt, kc, vc = _codecs(name, head_size, h, dtype)
    g = fmt.key.group_size
    block_size = random.choice([bs for bs in (32, 64) if bs % g == 0])
    ns = [random.randint(1, max_context) | 1 for _ in range(batch)]  # odd lengths
    if not window:  # some rows end exactly on a group boundary
        ns[random.randrange(batch)] = g * random.randint(1, max_context // g)
    per_req = -(-max(ns) // block_size) + 1
    num_blocks = batch * per_req + 2
    cache = junk_cache(num_blocks, h, block_size, fmt.slot_bytes(head_size))
    table = random_block_tables(batch, per_req, num_blocks)
    rows = []
    for b, n in enumerate(ns):
        pos = torch.arange(n)
        slots = table[b, pos // block_size].long() * block_size + pos % block_size
        k = _keys(n, h, head_size, dtype)
        v = torch.randn(n, h, head_size).to(dtype)
        ref.store_slots(k, v, cache, slots, kc, vc)
        m = n // g * g
        if m:
            plan = GroupPlan(g, torch.arange(m), torch.full((m,), -1), slots[:m])
            pack_groups(plan, k, torch.zeros(1, 1, h, head_size, dtype=dtype), cache, kc)
        rows.append((n, k, v))
    return fmt, kc, vc, cache, table, block_size, rows


def _window_rows(rows, g, size):
    """Per row (slot, packed, exact): the window holds the open group's tokens and, for some
    rows, more (up to the ring size), so the packed context ends inside a completed group."""
    slots = random.sample(range(len(rows) + 2), len(rows))
    out = []
    for b, (n, _, _) in enumerate(rows):
        open_tokens = n % g
        exact = random.choice([open_tokens, random.randint(open_tokens, min(size, n))])
        out.append((slots[b], n - exact, exact))
    return out


def _ring(rows, wins, num_slots, size, h, d, dtype):
    """Exact K/V of every row's window positions, large junk everywhere else."""
    ring_k = (torch.randn(num_slots, size, h, d) * 30).to(dtype)
    ring_v = torch.full((num_slots, size, h, d), 1e3).to(dtype)
    for (n, k, v), (slot, packed, exact) in zip(rows, wins):
        idx = torch.arange(packed, n)
        ring_k[slot, idx % size] = k[idx]
        ring_v[slot, idx % size] = v[idx]
    return ring_k, ring_v


def _setup(name, head_size, batch, window):
    h = random.randint(1, 2)
    dtype = random.choice([torch.bfloat16, torch.float16])
    fmt, kc, vc, cache, table, bs, rows = _context(name, head_size, h, batch, dtype, window)
    g = fmt.key.group_size
    kw = {}
    if window:
        size = random.choice([g, 2 * g])
        wins = _window_rows(rows, g, size)
        ring = _ring(rows, wins, batch + 2, size, h, head_size, dtype)
        slots = torch.tensor([w[0] for w in wins])
        packed = [w[1] for w in wins]
        exact = torch.tensor([w[2] for w in wins])
        kw = {"ring": ring, "window_slots": slots, "window_exact": exact}
        desc = f"R={size} (slot, packed, exact)={wins}"
    else:  # no window: any prefix of the completed groups
        packed = [random.randint(0, n // g * g) for n, _, _ in rows]
        desc = f"packed={packed}"
    what = (f"{name} D={head_size} H={h} bs={bs} n={[r[0] for r in rows]} {desc} {dtype}")
    return h, dtype, kc, vc, cache, table, packed, kw, what


def _run_decode(name, *, head_size, gqa, window, seed, batch=3):
    h, dtype, kc, vc, cache, table, packed, kw, what = _setup(name, head_size, batch, window)
    splits = random.choice([1, 2, 3])
    q = torch.randn(batch, h * gqa, head_size).to(dtype)
    k = _keys(batch, h, head_size, dtype)
    v = torch.randn(batch, h, head_size).to(dtype)
    lens = torch.tensor(packed, dtype=random.choice([torch.int32, torch.int64]))
    scale = head_size ** -0.5
    want = ref.decode_attention(q, k, v, cache, table, lens, kc, vc, scale, **kw)
    got = api.decode_attention(q, k, v, cache, table, lens, kc, vc, scale, num_splits=splits,
                               **kw)
    check_attention(got, want, dtype, f"decode {what} g={gqa} splits={splits} seed={seed}")


def _run_prefill(name, *, head_size, gqa, window, seed, batch=3):
    h, dtype, kc, vc, cache, table, packed, kw, what = _setup(name, head_size, batch, window)
    splits = random.choice([1, 2, 3])
    qlens, qsl = random_query_lens(batch)
    t = qsl[-1]
    q = torch.randn(t, h * gqa, head_size).to(dtype)
    k = _keys(t, h, head_size, dtype)
    v = torch.randn(t, h, head_size).to(dtype)
    scale = head_size ** -0.5
    want = ref.prefill_attention_varlen(q, k, v, cache, table, qsl, packed, kc, vc, scale,
                                        **kw)
    got = api.prefill_attention_varlen(q, k, v, cache, table, qsl, packed, kc, vc, scale,
                                       num_splits=splits, **kw)
    check_attention(got, want, dtype, f"prefill {what} g={gqa} splits={splits} Tq={qlens} seed={seed}")


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_kivi_decode_window(head_size, gqa, seed):
    _run_decode(random.choice(NAMES), head_size=head_size, gqa=gqa, window=True, seed=seed)


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_kivi_prefill_window(head_size, gqa, seed):
    _run_prefill(random.choice(NAMES), head_size=head_size, gqa=gqa, window=True, seed=seed)


@pytest.mark.parametrize("name", NAMES)
def test_kivi_formats_without_window(name, seed):
    """Every format, decode and prefill, reading packed groups only."""
    head_size = random.choice([64, 128])
    gqa = random.choice([1, 3, 4])
    _run_decode(name, head_size=head_size, gqa=gqa, window=False, seed=seed)
    _run_prefill(name, head_size=head_size, gqa=gqa, window=False, seed=seed)


def test_kivi_head_size_256(seed):
    name = random.choice(list(WINDOWED_PRESETS))
    _run_decode(name, head_size=256, gqa=random.choice([1, 3]), window=True, seed=seed,
                batch=2)
    _run_prefill(name, head_size=256, gqa=1, window=True, seed=seed, batch=2)


@pytest.mark.parametrize("name", NAMES)
def test_kivi_store_matches_reference(name, seed):
    """The store kernel writes what the reference store writes: zero key bytes (the group is
    packed later), the value field as for any format, zero padding; -1 slots untouched."""
    d = random.choice([64, 128])
    h = random.randint(1, 2)
    dtype = random.choice([torch.bfloat16, torch.float16])
    fmt, kc, vc = _codecs(name, d, h, dtype)
    n = random.randint(1, 40)
    slots = torch.randperm(4 * 32)[:n]
    slots[random.randrange(n)] = -1
    k = _keys(n, h, d, dtype)
    v = torch.randn(n, h, d).to(dtype)
    redraw_ambiguous_rows(v, vc)
    want = junk_cache(4, h, 32, fmt.slot_bytes(d))
    got = want.clone()
    ref.store_slots(k, v, want, slots, kc, vc)
    api.store_slots(k, v, got, slots, kc, vc)
    kb = kc.nbytes
    assert torch.equal(got[..., :kb], want[..., :kb]), f"{name} D={d}: key bytes differ"
    assert torch.equal(got[..., kb + vc.nbytes:], want[..., kb + vc.nbytes:]), "padding"
    gv, wv = (c[..., kb:kb + vc.nbytes].permute(0, 2, 1, 3).reshape(4 * 32, h, -1)
              for c in (got, want))
    written = torch.zeros(4 * 32, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert torch.equal(gv[~written], wv[~written]), f"{name} D={d}: touched a foreign slot"
    gv, wv = gv[written].flatten(0, 1), wv[written].flatten(0, 1)
    if isinstance(vc, IntGroupCodec):  # rotated fields may slip a rounding (field_checks.py)
        check_int_field(vc, gv, wv, f"{name} D={d} values")
    else:
        assert torch.equal(gv, wv), f"{name} D={d}: value bytes differ"


def test_kivi_group_must_divide_the_block_size():
    fmt, kc, vc = _codecs("kivi2", 64, 1, torch.bfloat16)
    cache = junk_cache(2, 1, 16, fmt.slot_bytes(64))
    q = torch.randn(1, 1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="must divide the block size"):
        api.decode_attention(q, q, q, cache, torch.zeros(1, 2, dtype=torch.int32),
                             torch.tensor([20]), kc, vc, 0.125)
