"""Kernel dispatch: which layers run the Triton kernels, the CPU kernels or the torch path."""

import pytest
import torch

from vllm_kvq import paged_attention
from vllm_kvq.config import PRESETS, KVQConfigError
from vllm_kvq.cpu_kernel import ops as cpu_ops
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
    with pytest.raises(KVQConfigError, match="allowed values are auto, triton, cpu, torch"):
        check_kernel_choice("cpu", [K4V2], 64, torch.bfloat16)


@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_recent_window_runs_on_the_kernels(monkeypatch, choice):
    """The kernels read the exact recent window from the ring: the choice takes no window."""
    from vllm_kvq.kernels import api

    monkeypatch.setenv(ENV, choice)
    assert check_kernel_choice("cuda", [K4V2, K4V2], 64, torch.bfloat16) == []
    assert attention_ops("cuda", K4V2, 64, torch.bfloat16) is api
    if choice == "auto":  # uncovered head sizes still fall back, window or not
        assert check_kernel_choice("cuda", [K4V2], 96, torch.bfloat16) == [0]
        assert attention_ops("cuda", K4V2, 96, torch.bfloat16) is paged_attention


def test_kivi_layers_use_the_kernels(monkeypatch):
    """KIVI keys (groups packed in torch, read by the kernels) run on the kernels like any
    other format; what the kernels still do not cover falls back under auto."""
    from dataclasses import replace

    from vllm_kvq.config import WINDOWED_PRESETS
    from vllm_kvq.kernels import api

    monkeypatch.setenv(ENV, "auto")
    kivi2, kivi4 = WINDOWED_PRESETS["kivi2"], WINDOWED_PRESETS["kivi4"]
    for fmt in (kivi2, kivi4):
        for head_size in (64, 128, 256):
            assert kernel_gap(fmt, head_size, torch.bfloat16) is None
    assert check_kernel_choice("cuda", [K4V2, kivi2, kivi4], 64, torch.bfloat16) == []
    assert attention_ops("cuda", kivi2, 128, torch.bfloat16) is api
    assert attention_ops("cpu", kivi2, 128, torch.bfloat16) is paged_attention
    # Still uncovered: head size 96, 8- and 128-token key groups.
    assert "head sizes" in kernel_gap(kivi2, 96, torch.bfloat16)
    odd = [replace(kivi2, key=replace(kivi2.key, group_size=g)) for g in (8, 128)]
    for fmt in odd:
        assert "KIVI key groups" in kernel_gap(fmt, 128, torch.bfloat16)
    assert check_kernel_choice("cuda", [kivi2, *odd], 128, torch.bfloat16) == [1, 2]
    assert check_kernel_choice("cuda", [kivi2], 96, torch.bfloat16) == [0]
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(KVQConfigError, match=r"cannot run layer 0 .*KIVI key groups of 16, 32, 64"):
        check_kernel_choice("cuda", odd, 128, torch.bfloat16)


def test_auto_on_cpu_runs_the_cpu_kernels_per_layer(monkeypatch):
    """auto on CPU: the compiled CPU kernels for the formats they read, the torch path for the
    others (QJL and KIVI keys); forced, an uncovered layer is refused at startup."""
    monkeypatch.setenv(ENV, "auto")
    qjl = PRESETS["qjl256v4"]
    assert check_kernel_choice("cpu", [K4V2, qjl, PRESETS["k4v3"]], 64, torch.bfloat16) == [1]
    assert attention_ops("cpu", K4V2, 64, torch.bfloat16) is cpu_ops
    assert attention_ops("cpu", qjl, 64, torch.bfloat16) is paged_attention
    monkeypatch.setenv(ENV, "cpu")
    assert attention_ops("cpu", PRESETS["bf16"], 64, torch.float16) is cpu_ops
    with pytest.raises(KVQConfigError, match=r"VLLM_KVQ_KERNELS=cpu cannot run layer 1 .*QJL"):
        check_kernel_choice("cpu", [K4V2, qjl], 64, torch.bfloat16)
    with pytest.raises(KVQConfigError, match=r"=cpu runs the CPU kernels, but the device is cuda"):
        check_kernel_choice("cuda", [K4V2], 64, torch.bfloat16)
    monkeypatch.setenv(ENV, "torch")
    assert attention_ops("cpu", K4V2, 64, torch.bfloat16) is paged_attention
