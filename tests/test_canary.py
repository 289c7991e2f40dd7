"""The startup canary (vllm_kvq/canary.py) passes a sound layer and stops a corrupted one.

Engine-free, through the backend harness: the first prefill step of at least 16 tokens runs
the check on the layer's real inputs; a codec whose decode is deliberately wrong (values
scaled by 1.5, a plausible scale bug) must be refused with one sentence before the step's
attention is returned, and ``"canary": false`` must skip the check.
"""

import pytest
import torch

from tests.test_backend_conformance import Harness
from vllm_kvq.canary import SPEC_TOLERANCE, KVQCanaryError, check_layer

pytestmark = pytest.mark.usefixtures("one_thread", "seed")


def _harness(tmp_path_factory, preset, **kvq):
    return Harness(tmp_path_factory, head_size=64, num_heads=6, num_kv_heads=2, block_size=16,
                   kvq={"preset": preset, **kvq}, num_layers=1)


def _corrupt(codec):
    decode = codec.decode
    codec.decode = lambda packed: decode(packed) * 1.5


@pytest.mark.parametrize("preset", ["k4v2", "qjl256v4", "k8v8", "bf16"])
def test_a_sound_layer_passes(tmp_path_factory, preset, monkeypatch):
    h = _harness(tmp_path_factory, preset)
    seen = []
    monkeypatch.setattr("vllm_kvq.backend.check_layer",
                        lambda *a, **kw: seen.append(check_layer(*a, **kw)) or seen[-1])
    (r,) = h.make_requests([(0, 40)])
    h.step(0, h.junk_cache(0), [r])
    (result,) = seen
    assert result["vs_spec"] < 1e-5  # the torch path is its own reference, to fp32 rounding
    assert result["vs_exact"] < (1e-2 if preset == "bf16" else 0.9)
    assert not h.impls[0].canary_pending


def test_a_corrupted_codec_is_refused(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLLM_KVQ_KERNELS", "torch")  # the codec's decode is the serving path
    h = _harness(tmp_path_factory, "k4v2")
    (short,) = h.make_requests([(0, 5)])
    cache = h.junk_cache(0)
    h.step(0, cache, [short])  # too short to check: the canary waits for a longer prompt
    assert h.impls[0].canary_pending
    _corrupt(h.impls[0].paths[0].value_codec)
    (r,) = h.make_requests([(0, 40)])
    with pytest.raises(KVQCanaryError) as err:
        h.step(0, h.junk_cache(0), [r])
    msg = str(err.value)
    assert msg.startswith("KVQ startup check failed on layer 0") and "\n" not in msg
    assert f"(allowed {SPEC_TOLERANCE})" in msg and "\"canary\": false" in msg


def test_corrupted_cpu_kernels_are_refused(tmp_path_factory, monkeypatch):
    from vllm_kvq.cpu_kernel import ops

    attend = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: attend(*a, **kw) * 1.5)
    h = _harness(tmp_path_factory, "k4v3")
    (r,) = h.make_requests([(0, 40)])
    with pytest.raises(KVQCanaryError, match="KVQ startup check failed on layer 0"):
        h.step(0, h.junk_cache(0), [r])
    assert h.impls[0].paths[0].ops is ops  # auto on CPU: the CPU kernels serve, and were checked


def test_the_canary_can_be_turned_off(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLLM_KVQ_KERNELS", "torch")
    h = _harness(tmp_path_factory, "k4v2", canary=False)
    (warm,) = h.make_requests([(0, 3)])
    h.step(0, h.junk_cache(0), [warm])
    _corrupt(h.impls[0].paths[0].value_codec)
    (r,) = h.make_requests([(0, 40)])
    out = h.step(0, h.junk_cache(0), [r])  # served (wrongly): the user opted out
    assert torch.isfinite(out).all()
