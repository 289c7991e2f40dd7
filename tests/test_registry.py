"""The storage-format registry: every format answers for itself, and a new one plugs in.

A format registered from outside the package (here: fp16 values stored in a byte-swapped
order, with no kernel pieces) is found by name, sized, checked and run by the torch path, and
the kernel dispatch reports the gap instead of failing -- nothing else is edited.
"""

from dataclasses import dataclass

import pytest
import torch

from vllm_kvq import paged_attention
from vllm_kvq.config import PRESETS, KVQConfigError
from vllm_kvq.dispatch import ENV, attention_ops, check_kernel_choice, kernel_gap
from vllm_kvq.formats import FORMATS, SLOT_ALIGN, LayerFormat, build_codecs, storage_format
from vllm_kvq.formats.codec import Codec
from vllm_kvq.formats.registry import StorageFormat, register


class SwappedCodec(Codec):
    def __init__(self, spec, head_size):
        self.spec, self.nbytes = spec, 2 * head_size

    def encode(self, x):
        return x.half().contiguous().view(torch.uint8).flip(-1)

    def decode(self, packed):
        return packed.flip(-1).contiguous().view(torch.float16).float()


@pytest.fixture
def swapped():
    @register
    @dataclass(frozen=True)
    class Swapped(StorageFormat):
        kind = "swapped16"
        kernel_kind = 99
        roles = ("value",)

        def nbytes(self, head_size):
            return 2 * head_size

        def describe(self):
            return "byte-swapped fp16"

        def tag(self):
            return "swap16"

        def codec(self, head_size, dtype, seed, layer, global_heads):
            return SwappedCodec(self, head_size)

        def kernel_fields(self, head_size):
            raise AssertionError("the kernels must not ask a format they have no pieces for")

    yield Swapped
    del FORMATS["swapped16"]


def test_every_shipped_format_is_registered_once():
    assert set(FORMATS) == {"raw", "int", "qjl", "kivi", "lloyd"}
    assert len({f.kernel_kind for f in FORMATS.values()}) == len(FORMATS)
    for preset in PRESETS.values():
        for spec in (preset.key, preset.value):
            assert FORMATS[spec.kind] is type(spec)
            assert storage_format(spec.kind, **spec.__dict__) == spec


def test_a_name_or_kernel_kind_is_registered_once(swapped):
    with pytest.raises(ValueError, match="registered twice"):
        register(swapped)
    with pytest.raises(ValueError, match="unknown storage format 'nope'.*swapped16"):
        storage_format("nope")


def test_a_new_format_plugs_in_without_edits_elsewhere(swapped, monkeypatch):
    fmt = LayerFormat(PRESETS["k4v2"].key, storage_format("swapped16"))
    raw = PRESETS["k4v2"].key.nbytes(64) + 128
    assert fmt.slot_bytes(64) == -(-raw // SLOT_ALIGN) * SLOT_ALIGN
    assert fmt.check(64, 0, 16, "layer 0") is None
    refusal = LayerFormat(storage_format("swapped16"), PRESETS["k4v2"].value).check(
        64, 0, 16, "layer 2")
    assert "layer 2 asks for them for keys" in refusal
    # The kernels have no pieces for it: auto falls back to the torch path, triton refuses.
    assert "no pieces for swapped16" in kernel_gap(fmt, 64, torch.bfloat16)
    monkeypatch.setenv(ENV, "auto")
    assert check_kernel_choice("cuda", [PRESETS["k4v2"], fmt], 64, torch.bfloat16) == [1]
    assert attention_ops("cuda", fmt, 64, torch.bfloat16) is paged_attention
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(KVQConfigError, match="cannot run layer 0 .*no pieces for swapped16"):
        check_kernel_choice("cuda", [fmt], 64, torch.bfloat16)
    # The torch path runs it: raw keys and swapped values read back exactly (bf16 -> fp16
    # is exact for these values), so decode is exact attention over the 5 tokens.
    exact_fmt = LayerFormat(PRESETS["bf16"].key, storage_format("swapped16"))
    kc, vc = build_codecs(exact_fmt, 64, torch.bfloat16, 0, 0, [0])
    k, v, q = (torch.randn(5, 1, 64).bfloat16() for _ in range(3))
    assert torch.equal(vc.decode(vc.encode(v)), v.float())
    cache = torch.zeros(1, 1, 16, exact_fmt.slot_bytes(64), dtype=torch.uint8)
    paged_attention.store_slots(k[:4], v[:4], cache, torch.arange(4), kc, vc)
    out = paged_attention.decode_attention(q[4:], k[4:], v[4:], cache,
                                           torch.zeros(1, 1, dtype=torch.int32),
                                           torch.tensor([4]), kc, vc, 0.125)
    p = torch.softmax(k[:, 0].float() @ q[4, 0].float() * 0.125, 0)
    torch.testing.assert_close(out[0, 0], p @ v[:, 0].float(), rtol=1e-5, atol=1e-5)
