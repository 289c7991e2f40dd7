"""Kernel dispatch: which layers run the Triton kernels and which the torch path."""

import pytest
import torch

from vllm_kvq import paged_attention
from vllm_kvq.config import PRESETS, KVQConfigError
from vllm_kvq.dispatch import ENV, attention_ops, check_kernel_choice, kernel_gap

K4V2 = PRESETS["k4v2"]


def test_kernels_cover_power_of_two_heads_only():
    assert kernel_gap(K4V2, 128, torch.bfloat16) is None
    assert "head sizes" in kernel_gap(K4V2, 96, torch.bfloat16)


def test_auto_on_cuda_falls_back_per_layer(monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    assert check_kernel_choice("cuda", [K4V2, K4V2], 80, torch.bfloat16) == [0, 1]
    assert check_kernel_choice("cuda", [K4V2], 64, torch.bfloat16) == []
    assert attention_ops("cuda", K4V2, 80, torch.bfloat16) is paged_attention
    assert attention_ops("cpu", K4V2, 64, torch.bfloat16) is paged_attention


def test_forced_triton_refuses_uncovered_layers(monkeypatch):
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(KVQConfigError, match=r"cannot run layer 0 .*head sizes.*allowed values"):
        check_kernel_choice("cuda", [PRESETS["bf16"], K4V2], 96, torch.float16)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KVQConfigError, match="TRITON_INTERPRET=1"):
        check_kernel_choice("cpu", [K4V2], 64, torch.bfloat16)


def test_bad_choice_is_one_sentence(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(KVQConfigError, match="allowed values are auto, triton, torch"):
        check_kernel_choice("cpu", [K4V2], 64, torch.bfloat16)


@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_recent_window_runs_on_the_kernels(monkeypatch, choice):
    """The kernels read the exact recent window from the ring: a window changes nothing."""
    from vllm_kvq.kernels import api

    monkeypatch.setenv(ENV, choice)
    assert check_kernel_choice("cuda", [K4V2, K4V2], 64, torch.bfloat16, window=64) == []
    assert attention_ops("cuda", K4V2, 64, torch.bfloat16, window=64) is api
    if choice == "auto":  # uncovered head sizes still fall back, window or not
        assert check_kernel_choice("cuda", [K4V2], 96, torch.bfloat16, window=64) == [0]
        assert attention_ops("cuda", K4V2, 96, torch.bfloat16, window=64) is paged_attention


def test_kivi_layers_use_the_torch_path(monkeypatch):
    from vllm_kvq.config import WINDOWED_PRESETS

    monkeypatch.setenv(ENV, "auto")
    kivi = WINDOWED_PRESETS["kivi2"]
    assert "KIVI" in kernel_gap(kivi, 64, torch.bfloat16)
    assert check_kernel_choice("cuda", [K4V2, kivi], 64, torch.bfloat16, window=32) == [1]
