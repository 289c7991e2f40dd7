"""4-bit weights that vLLM loads: asymmetric int4 codes in groups of input channels, written
as a compressed-tensors ``pack-quantized`` checkpoint (vLLM's CPUWNA16 kernel on CPU,
Marlin / Machete on CUDA).

The codes, scales and zero points come from compressed-tensors itself (its ``quantize`` /
``dequantize`` and qparams), so the weights a method evaluates in torch (``fake_quantize``)
are exactly the ones packed. Methods choose the qparams (and, for GPTQ, the codes' targets):

- ``rtn``: round to nearest on each group's [min, max] (the baseline);
- ``gptq``: GPTQ on calibration windows of the essays (``gptq.py``).

Every Linear layer of the decoder is quantized; ``lm_head`` and the (tied) embedding stay in
the model dtype. Group size 64 by default: SmolLM2's hidden size 576 is not a multiple of
128, and its weights came from a Q4_1 GGUF whose 32-weight blocks hold at most 16 distinct
values each, so 4-bit codes in 32-weight groups would reproduce it almost exactly and say
nothing about the method.
"""

from dataclasses import dataclass

import torch

IGNORED = ["lm_head"]  # the tied embedding is not a Linear: it stays as it is


def weight_args(group_size: int):
    """compressed-tensors' description of the codes: int4, asymmetric, per group of
    ``group_size`` input channels (0: one group per output channel, all its inputs)."""
    from compressed_tensors.quantization import QuantizationArgs

    if group_size == 0:
        return QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                            group_size=group_size)


@dataclass
class QParams:
    """One Linear's scales and zero points ``[out, in / group]``."""

    scale: torch.Tensor
    zero_point: torch.Tensor


def group_range(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row and input group: (min, max) ``[out, in / group]`` (one group per row
    for group size 0)."""
    w = weight.float().unflatten(1, (-1, group_size or weight.shape[1]))
    return w.amin(-1), w.amax(-1)


def rtn_qparams(weight: torch.Tensor, group_size: int, shrink: torch.Tensor | float = 1.0
                ) -> QParams:
    """Round-to-nearest qparams of each group's range (optionally shrunk towards its middle
    by ``shrink`` in (0, 1], the clipping the learnable methods tune)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    lo, hi = group_range(weight, group_size)
    scale, zero_point = calculate_qparams(lo * shrink, hi * shrink, weight_args(group_size))
    return QParams(scale.to(weight.dtype), zero_point)


def fake_quantize(weight: torch.Tensor, qp: QParams, group_size: int) -> torch.Tensor:
    """The weight the checkpoint holds, dequantized: what vLLM multiplies with."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake

    return ct_fake(weight, qp.scale, qp.zero_point, weight_args(group_size)).to(weight.dtype)


def quantized_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The decoder's Linear layers, in order (lm_head excluded)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in IGNORED]


def check_shapes(model, group_size: int) -> None:
    """What vLLM's W4A16 kernels need of every quantized layer, before any work is done."""
    for name, m in quantized_linears(model):
        out_features, in_features = m.weight.shape
        if in_features % (group_size or in_features) or in_features % 32 or out_features % 32:
            raise ValueError(
                f"{name} is {out_features} x {in_features}: --group-size must divide its input "
                f"size, and vLLM's 4-bit kernels need both sizes to be multiples of 32.")


def export(model, tokenizer, qparams: dict[str, QParams], group_size: int, out_dir: str
           ) -> None:
    """Write the model with each Linear's ``qparams`` as a compressed-tensors pack-quantized
    checkpoint (weights packed by compressed-tensors from the unquantized weights)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)

    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(group_size))
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORED,
                                format="pack-quantized",
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config)
    linears = dict(quantized_linears(model))
    if set(linears) != set(qparams):
        raise ValueError("qparams must cover exactly the model's quantized Linear layers")
    for name, m in linears.items():
        m.weight_scale.data = qparams[name].scale.to(m.weight_scale.dtype)
        m.weight_zero_point.data = qparams[name].zero_point.to(m.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    tokenizer.save_pretrained(out_dir)


METHODS = {"rtn": "round to nearest on each group's range",
           "gptq": "GPTQ: rounding errors compensated on the later columns (calibrated)"}


def quantize_model(path: str, method: str, group_size: int, windows: list[list[int]]):
    """The bf16 model at ``path`` with its Linear weights replaced by ``method``'s quantized
    weights (on the checkpoint's grid), and each one's qparams."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    check_shapes(model, group_size)
    linears = dict(quantized_linears(model))
    if method == "rtn":
        qparams = {name: rtn_qparams(m.weight.data, group_size) for name, m in linears.items()}
    elif method == "gptq":
        from .gptq import sequential_gptq

        calibration = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results = sequential_gptq(calibration, windows, group_size)
        qparams = {name: qp for name, (_, qp) in results.items()}
        for name, (q, _) in results.items():
            linears[name].weight.data = q.to(torch.bfloat16)
    else:
        raise ValueError(f"--method {method!r} is unknown; allowed: {', '.join(METHODS)}")
    return model, qparams


def main(argv=None) -> dict:
    import argparse
    import json
    import os
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import calibration

    parser = argparse.ArgumentParser(
        prog="python -m vllm_kvq.wkvquant weights",
        description="Quantize a model's Linear weights to 4 bits and write a compressed-tensors "
                    "pack-quantized checkpoint that vLLM loads.")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--method", default="rtn", choices=list(METHODS))
    parser.add_argument("--group-size", type=int, default=64,
                        help="input channels per scale and zero point (0: per output channel)")
    parser.add_argument("--dequantized-out", help="also write the same weights dequantized "
                        "(bf16): the packing check's reference")
    calibration.add_arguments(parser, windows=16)  # read by gptq
    args = parser.parse_args(argv)
    t0 = time.time()
    path = calibration.model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration.windows(args, tokenizer) if args.method != "rtn" else []
    model, qparams = quantize_model(path, args.method, args.group_size, windows)
    if args.dequantized_out:
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        weights = dict(quantized_linears(model))
        for name, m in quantized_linears(reference):
            m.weight.data = fake_quantize(weights[name].weight.data, qparams[name],
                                          args.group_size)
        reference.save_pretrained(args.dequantized_out)
        tokenizer.save_pretrained(args.dequantized_out)
    export(model, tokenizer, qparams, args.group_size, args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
               if f.endswith(".safetensors"))
    record = {"method": args.method, "group_size": args.group_size, "model": path,
              "calibration": calibration.describe(args) if windows else None,
              "checkpoint_bytes": size, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "wkvquant.json"), "w") as f:  # how it was made
        json.dump(record, f, indent=1)
    print(f"{args.method} W4 (groups of {args.group_size or 'a whole row'}): wrote {args.out} "
          f"({size / 2**20:.1f} MiB of weights) in {record['seconds']} s")
    return record
