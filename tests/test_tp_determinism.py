"""A KV head is packed identically whatever the tensor-parallel split.

Every random quantity (rotations, QJL projections) is a function of (seed, layer, global KV
head), so the bytes a head stores at TP=1 equal the bytes it stores at TP=2 or TP=3, and
replicated heads (TP > KV heads) are identical on every rank that holds them.
"""

import pytest
import torch

from vllm_kvq import layers
from vllm_kvq.config import PRESETS
from vllm_kvq.formats import build_codecs

NUM_KV_HEADS = 6  # divisible by 1, 2 and 3


@pytest.mark.parametrize("preset", ["k4v2", "qjl256v4", "k2v2"])
@pytest.mark.parametrize("tp", [2, 3])
def test_packed_bytes_identical_across_tp_sizes(preset, tp):
    head_size, layer = 64, 7
    key = torch.randn(33, NUM_KV_HEADS, head_size).bfloat16()
    value = torch.randn(33, NUM_KV_HEADS, head_size).bfloat16()
    fmt = PRESETS[preset]
    full_k, full_v = build_codecs(fmt, head_size, torch.bfloat16, 0, layer,
                                  list(range(NUM_KV_HEADS)))
    whole = torch.cat([full_k.encode(key), full_v.encode(value)], -1)
    per_rank = NUM_KV_HEADS // tp
    for rank in range(tp):
        heads = list(range(rank * per_rank, (rank + 1) * per_rank))
        k, v = build_codecs(fmt, head_size, torch.bfloat16, 0, layer, heads)
        part = torch.cat([k.encode(key[:, heads]), v.encode(value[:, heads])], -1)
        assert torch.equal(part, whole[:, heads])


def test_different_heads_layers_and_seeds_get_different_maps():
    fmt = PRESETS["qjl256v4"]
    a, _ = build_codecs(fmt, 64, torch.bfloat16, 0, 3, [0, 1])
    b, _ = build_codecs(fmt, 64, torch.bfloat16, 0, 4, [0, 1])
    c, _ = build_codecs(fmt, 64, torch.bfloat16, 1, 3, [0, 1])
    assert not torch.equal(a.proj[0], a.proj[1])
    assert not torch.equal(a.proj, b.proj)
    assert not torch.equal(a.proj, c.proj)


@pytest.mark.parametrize("tp, total, local, expected", [
    (1, 3, 3, [[0, 1, 2]]),
    (3, 3, 1, [[0], [1], [2]]),
    (2, 4, 2, [[0, 1], [2, 3]]),
    (6, 3, 1, [[0], [0], [1], [1], [2], [2]]),  # replicated: 2 ranks per KV head
    (4, 2, 1, [[0], [0], [1], [1]]),
])
def test_global_kv_head_indices(monkeypatch, tp, total, local, expected):
    for rank in range(tp):
        monkeypatch.setattr(layers, "_tp_rank_and_size", lambda r=rank: (r, tp))
        assert layers.global_kv_heads(local, total) == expected[rank]


def test_layer_identity_whatever_the_names_look_like():
    """The name's single integer when every layer's name has one; else the construction
    order (identical on every rank); outside a model, the name's integer or layer 0 when
    every layer has the same format, and a clear error under a per-layer policy."""
    from types import SimpleNamespace

    def config(names):
        return SimpleNamespace(compilation_config=SimpleNamespace(
            static_forward_context=dict.fromkeys(names)))

    indexed = config([f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2)])
    assert layers.layer_index("model.layers.2.self_attn.attn", indexed, False) == 2
    unindexed = config(["decoder.attn_a", "decoder.attn_b", "blocks.3.mix.1.attn"])
    assert [layers.layer_index(n, unindexed, False) for n in
            ("decoder.attn_a", "decoder.attn_b", "blocks.3.mix.1.attn")] == [0, 1, 2]
    assert layers.layer_index("model.layers.5.attn", None, False) == 5
    assert layers.layer_index("placeholder", None, True) == 0
    assert layers.layer_index(None, indexed, True) == 0
    with pytest.raises(ValueError, match="cannot tell which layer 'placeholder' is"):
        layers.layer_index("placeholder", indexed, False)
