"""Launch planning that the context kernel's main loop depends on.

``block_divisor`` replaces the per-token integer division ``pos // block_size`` by a wide
multiply and a shift; it must be exact for every position a context can hold and every block
size vLLM may choose (powers of two, and the odd sizes of hybrid models). ``folds_keys`` /
``folds_values`` decide which loops read int codes folded (scales out of the dots); the
kernel tests in test_decode.py / test_prefill.py run both kinds, and this checks that the
configurations the issue-13 targets name (decode, head size 128, 32-channel groups) fold.
"""

import random

import pytest
import torch

from vllm_kvq.config import PRESETS
from vllm_kvq.kernels import launch
from vllm_kvq.kernels.layout import layout_for_format


def _edge_positions(block_size: int) -> list[int]:
    last = 2 ** 31 - 1
    around = [0, 1, block_size - 1, block_size, block_size + 1, last, last - 1,
              last - last % block_size, last - last % block_size - 1]
    return [p for p in around if 0 <= p <= last]


@pytest.mark.parametrize("block_sizes", [range(1, 1025), [1536, 2048, 4096, 65535, 65536, 1 << 20]])
def test_block_divisor_is_exact(block_sizes, seed):
    """Every block size against the division itself: the positions around each multiple
    boundary and the top of the int32 range, plus fresh random positions."""
    for bs in block_sizes:
        m, s = launch.block_divisor(bs)
        assert 0 < m < 2 ** 32 and 2 ** 31 - 1 < 2 ** 63 // m  # the product fits in int64
        positions = _edge_positions(bs) + [random.randrange(2 ** 31) for _ in range(64)]
        for pos in positions:
            assert (pos * m) >> s == pos // bs, (bs, pos)


def test_block_divisor_refuses_an_empty_block():
    with pytest.raises(ValueError, match="block size"):
        launch.block_divisor(0)


@pytest.mark.parametrize("preset", ["k4v2", "k4v4", "k2v2", "k4v3", "k8v8"])
def test_decode_at_head_size_128_reads_folded_codes(preset):
    layout = layout_for_format(PRESETS[preset], 128, torch.bfloat16)
    ce, *_ = launch.context_launch(layout, 4, is_decode=True)
    assert ce["MP"] == 8 and ce["K_FOLD"] == layout.K_SPLIT
    assert ce["K_FOLD"] or preset == "k8v8"
    assert ce["V_FOLD"] == (launch.FOLD_BYTES if layout.V_BITS == 3 else launch.FOLD_WORDS)


def test_wide_tiles_keep_the_dequantizing_path():
    """Prefill tiles of 32 query rows at head size 128 would spread each query piece over
    4 x 32 columns (spills on sm_80): they dequantize before the dot instead."""
    layout = layout_for_format(PRESETS["k4v2"], 128, torch.bfloat16)
    ce, *_ = launch.context_launch(layout, 32, is_decode=False)
    assert not ce["K_FOLD"] and not ce["V_FOLD"]
