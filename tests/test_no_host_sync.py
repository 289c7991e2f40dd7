"""The plan-once contract on the GPU path: ``forward`` (and the KV-cache update) of a KVQ layer
never synchronizes with the host, so a decode step can be captured in a CUDA graph and no
layer waits for the GPU to drain.

Everything that depends only on the step (tile maps, query starts, device context lengths,
window slots, KIVI group plans) comes from the metadata builder; the layer's own work is device
ops and kernel launches. The test runs layers of every preset through the Triton kernels
(Triton's interpreter here; the same wrappers launch them on a GPU) on decode-only, mixed and
prefill-only steps, with and without the exact recent window, with every host-synchronizing
call trapped while ``forward`` and ``do_kv_cache_update`` run -- except inside a kernel launch,
where the interpreter itself reads tensors on the host. A trapped call fails the test and
names the call and the line that made it.
"""

import contextlib
import functools
import random
import traceback

import pytest
import torch

from tests.test_backend_conformance import Harness
from vllm_kvq.config import PRESETS, WINDOWED_PRESETS
from vllm_kvq.window import publish_batch

pytestmark = pytest.mark.usefixtures("one_thread", "seed")


class HostSync(AssertionError):
    pass


# Calls that wait for the device (or copy host data to it) when made on device tensors.
_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                   "__index__", "nonzero", "masked_select", "unique")
_TORCH_FUNCTIONS = ("tensor", "nonzero", "masked_select", "unique", "argwhere")


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def trapped_host_syncs():
    """Inside: any host-synchronizing call raises ``HostSync``, except while a kernel launch
    runs (``Launch.run``). Boolean-mask indexing (a hidden nonzero) and repeat_interleave
    without ``output_size`` count too."""
    from vllm_kvq.kernels import launch as kernel_launch

    armed = [True]
    originals = []

    def patch(owner, name, make):
        original = getattr(owner, name)
        originals.append((owner, name, original))
        setattr(owner, name, make(original))

    def trap(name, original):
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if armed[0]:
                raise HostSync(f"forward called {name}")
            return original(*args, **kwargs)
        return wrapped

    def trap_bool_index(name, original):
        @functools.wraps(original)
        def wrapped(self, index, *rest):
            if armed[0] and _has_bool_index(index):
                raise HostSync(f"forward indexed with a boolean mask ({name})")
            return original(self, index, *rest)
        return wrapped

    def trap_sized(original):
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if armed[0] and kwargs.get("output_size") is None and \
                    any(torch.is_tensor(a) for a in args[1:2]) | ("repeats" in kwargs):
                raise HostSync("forward called repeat_interleave without output_size")
            return original(*args, **kwargs)
        return wrapped

    def disarmed(original):
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            saved, armed[0] = armed[0], False
            try:
                return original(*args, **kwargs)
            finally:
                armed[0] = saved
        return wrapped

    for name in _TENSOR_METHODS:
        patch(torch.Tensor, name, functools.partial(trap, f"Tensor.{name}"))
    for name in _TORCH_FUNCTIONS:
        patch(torch, name, functools.partial(trap, f"torch.{name}"))
    for name in ("__getitem__", "__setitem__"):
        patch(torch.Tensor, name, functools.partial(trap_bool_index, f"Tensor.{name}"))
    patch(torch, "repeat_interleave", trap_sized)
    patch(kernel_launch.Launch, "run", disarmed)
    try:
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def test_the_trap_fires():
    """Each trapped call raises inside and works again outside (else the test below could
    pass by trapping nothing)."""
    x = torch.arange(6)
    calls = [lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: x.cpu(),
             lambda: int(x[1]), lambda: torch.tensor([1, 2]), lambda: x.nonzero(),
             lambda: x[x > 2], lambda: torch.repeat_interleave(x, x)]
    with trapped_host_syncs():
        for call in calls:
            with pytest.raises(HostSync):
                call()
        x[1:3] = x[3:5].clone()  # plain indexing stays allowed
    for call in calls:
        call()


def _trap_layer(impl):
    """Run the impl's forward and KV-cache update with host syncs trapped."""
    for name in ("forward", "do_kv_cache_update"):
        original = getattr(impl, name)

        def trapped(*args, _original=original, **kwargs):
            with trapped_host_syncs():
                try:
                    return _original(*args, **kwargs)
                except HostSync as sync:
                    where = traceback.extract_tb(sync.__traceback__)[-2]
                    raise HostSync(f"{sync} at {where.filename}:{where.lineno}") from None
        setattr(impl, name, trapped)


def _steps(h):
    """Three steps of three requests: fresh prompts (prefill only), then a mixed step (two decodes first, as vLLM orders them, and a chunk continuing the
    third prompt), then decodes only."""
    a, b, c = h.make_requests([(0, 41), (0, 23), (0, 29)], spare_blocks=12)
    yield "prefill", [("a", a), ("b", b), ("c", c)]
    a, b, c = h.next_token(a), h.next_token(b), _grow(h, h.next_token(c), 20)
    yield "mixed", [("a", a), ("b", b), ("c", c)]
    yield "decode", [("a", h.next_token(a)), ("b", h.next_token(b)), ("c", h.next_token(c))]


def _grow(h, r, extra):
    """``r`` with ``extra`` more new tokens in its step (a prefill chunk)."""
    for _ in range(extra):
        nxt = h.next_token(r)
        r.k, r.v, r.blocks = nxt.k, nxt.v, nxt.blocks
        r.q = torch.cat([r.q, nxt.q])
        r.query += 1
    return r


def _run(tmp_path_factory, monkeypatch, preset, window, kernels, seed, stored=None):
    """The three steps' outputs through ``kernels`` (inputs drawn from ``seed``) and the
    cache after each KV-cache update. Given ``stored`` (another run's caches), each update
    writes those bytes instead of storing: both runs then attend over identical bytes (a
    store may round a code at a tie the other way, which the field tests allow)."""
    monkeypatch.setenv("VLLM_KVQ_KERNELS", kernels)
    torch.manual_seed(seed)  # the harness draws from both generators
    random.seed(seed)
    kvq = {"preset": preset, "window": window, "canary": False, "seed": seed % (1 << 20)}
    block_size = 32 if preset in WINDOWED_PRESETS else 16  # KIVI: whole key groups per block
    h = Harness(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2,
                block_size=block_size, kvq=kvq, num_layers=1)
    impl, snapshots = h.impls[0], []
    if stored is None:
        _trap_layer(impl)
        update = impl.do_kv_cache_update

        def recorded(layer, key, value, kv_cache, slot_mapping):
            update(layer, key, value, kv_cache, slot_mapping)
            snapshots.append(kv_cache.clone())
        impl.do_kv_cache_update = recorded
    else:
        replay = iter(stored)
        impl.do_kv_cache_update = lambda layer, key, value, kv_cache, slots: \
            kv_cache.copy_(next(replay))
    cache, outputs = None, []
    for what, rows in _steps(h):
        reqs = [r for _, r in rows]
        h.set_block_table(reqs)
        cache = h.junk_cache(0) if cache is None else cache
        publish_batch([f"{kernels}-{name}" for name, _ in rows])
        outputs.append((what, h.step(0, cache, reqs).double()))
    return outputs, snapshots


@pytest.mark.parametrize("preset", [*PRESETS, *WINDOWED_PRESETS])
def test_forward_never_synchronizes(tmp_path_factory, monkeypatch, seed, preset):
    """... and attends as the torch path does over the same bytes (the kernel tests' bound:
    tests/kernels/helpers.TOL on top of the output's rounding)."""
    from tests.kernels.helpers import TOL
    from tests.test_backend_conformance import TIGHT

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # KIVI keys need a window of at least their 32-token group (the engine refuses less).
    window = 32 if preset in WINDOWED_PRESETS else random.choice([0, 16])
    kernel, stored = _run(tmp_path_factory, monkeypatch, preset, window, "triton", seed)
    reference, _ = _run(tmp_path_factory, monkeypatch, preset, window, "torch", seed, stored)
    for (what, out), (_, ref) in zip(kernel, reference, strict=True):
        assert torch.isfinite(out).all(), f"{preset} {what}: non-finite output"
        excess = (out - ref).abs() - (TIGHT[torch.bfloat16][0] * ref.abs() + TOL[torch.bfloat16])
        assert excess.max() <= 0, f"{preset} {what}: off the torch path by {excess.max():.3g}"
