"""4-bit weights that vLLM loads: asymmetric int4 codes in groups of input channels, written
as a compressed-tensors ``pack-quantized`` checkpoint (vLLM's CPUWNA16 kernel on CPU,
Marlin / Machete on CUDA).

The codes, scales and zero points come from compressed-tensors itself (its ``quantize`` /
``dequantize`` and qparams), so the weights a method evaluates in torch (``fake_quantize``)
are exactly the ones packed. Methods choose the qparams (and, for GPTQ, the codes' targets):

- ``rtn``: round to nearest on each group's [min, max] (the baseline);
- ``gptq``: GPTQ on calibration windows of the essays (``gptq.py``);
- ``lwc``: learnable weight clipping trained block by block on each block's output
  (OmniQuant; ``lwc.py``);
- ``crr``: the same clipping trained on the output k blocks downstream (WKVQuant's
  cross-block reconstruction regularization; ``crr.py``).

Every Linear layer of the decoder is quantized; ``lm_head`` and the (tied) embedding stay in
the model dtype. Group size 64 by default: SmolLM2's hidden size 576 is not a multiple of
128, and its weights came from a Q4_1 GGUF whose 32-weight blocks hold at most 16 distinct
values each, so 4-bit codes in 32-weight groups would reproduce it almost exactly and say
nothing about the method.
"""

from dataclasses import dataclass

import torch

IGNORED = ["lm_head"]  # the tied embedding is not a Linear: it stays as it is
Q_MIN, Q_MAX = -8, 7  # compressed-tensors' signed int4 codes (asymmetric: zero point in range)


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


def calculate(lo: torch.Tensor, hi: torch.Tensor, group_size: int, dtype: torch.dtype
              ) -> QParams:
    """The checkpoint's qparams for per-group ranges [lo, hi] (compressed-tensors' own
    computation; scales in ``dtype``, the model's)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(lo, hi, weight_args(group_size))
    return QParams(scale.to(dtype), zero_point)


def rtn_qparams(weight: torch.Tensor, group_size: int) -> QParams:
    """Round-to-nearest qparams: each group's full range."""
    lo, hi = group_range(weight, group_size)
    return calculate(lo, hi, group_size, weight.dtype)


def fake_quantize(weight: torch.Tensor, qp: QParams, group_size: int) -> torch.Tensor:
    """The weight the checkpoint holds, dequantized: what vLLM multiplies with."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake

    return ct_fake(weight, qp.scale, qp.zero_point, weight_args(group_size)).to(weight.dtype)


def quantized_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The decoder's Linear layers, in order (lm_head excluded)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in IGNORED]


GROUP_SIZES = (0, 32, 64, 128)  # what Marlin (CUDA) and CPUWNA16 (CPU) both load


def check_shapes(model, group_size: int) -> None:
    """What vLLM's W4A16 kernels need of every quantized layer, before any work is done."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size is {group_size}; allowed: "
                         f"{', '.join(map(str, GROUP_SIZES))} (0: one group per output row)")
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
           "gptq": "GPTQ: rounding errors compensated on the later columns (calibrated)",
           "lwc": "learned clipping per group, on each block's output (OmniQuant)",
           "crr": "learned clipping per group, on the output k blocks downstream (WKVQuant)"}


def quantize_model(path: str, method: str, group_size: int, windows: list[list[int]],
                   crr_settings=None):
    """The bf16 model at ``path``, each Linear's qparams under ``method`` and the
    calibration's record. The model's weights are what ``export`` quantizes with those
    qparams: the original ones, or for GPTQ its compensated weights (already on the grid)."""
    from transformers import AutoModelForCausalLM

    if method not in METHODS:
        raise ValueError(f"--method {method!r} is unknown; allowed: {', '.join(METHODS)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    check_shapes(model, group_size)
    linears = dict(quantized_linears(model))
    if method == "rtn":
        qparams = {name: rtn_qparams(m.weight.data, group_size) for name, m in linears.items()}
        return model, qparams, None
    calibration = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if method == "gptq":
        from .gptq import sequential_gptq

        results = sequential_gptq(calibration, windows, group_size)
        for name, (q, _) in results.items():
            linears[name].weight.data = q.to(torch.bfloat16)
        return model, {name: qp for name, (_, qp) in results.items()}, None
    from dataclasses import asdict, replace

    from .crr import CRRSettings, calibrate

    settings = crr_settings or CRRSettings()
    if method == "lwc":  # OmniQuant: each block's own output, squared error
        settings = replace(settings, blocks_ahead=1, loss="mse")
    qparams, records = calibrate(calibration, windows, group_size, settings)
    return model, qparams, {"settings": asdict(settings), "blocks": records}


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
    calibration.add_arguments(parser, windows=8)  # read by gptq, lwc and crr
    trained = parser.add_argument_group("lwc and crr (block-wise training of the clipping)")
    trained.add_argument("--blocks-ahead", type=int,
                         help="crr: k, the loss is taken k blocks downstream (default 5; lwc: 1)")
    trained.add_argument("--loss", choices=["mae", "mse"],
                         help="crr: the loss (default mae; lwc: mse)")
    trained.add_argument("--epochs", type=int, default=2, help="passes over the windows")
    trained.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate")
    trained.add_argument("--batch", type=int, default=2, help="windows per step")
    args = parser.parse_args(argv)
    from .crr import CRRSettings

    if args.method == "lwc" and (args.blocks_ahead, args.loss) != (None, None):
        parser.error("--method lwc is k = 1 with the MSE loss; --blocks-ahead and --loss are "
                     "for --method crr")
    try:
        settings = CRRSettings(5 if args.blocks_ahead is None else args.blocks_ahead,
                               args.loss or "mae", args.epochs, args.lr, args.batch)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.time()
    path = calibration.model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration.windows(args, tokenizer) if args.method != "rtn" else []
    model, qparams, trained_record = quantize_model(path, args.method, args.group_size,
                                                    windows, settings)
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
              "training": trained_record, "checkpoint_bytes": size,
              "dequantized": os.path.abspath(args.dequantized_out) if args.dequantized_out
              else None,
              "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "wkvquant.json"), "w") as f:  # how it was made
        json.dump(record, f, indent=1)
    print(f"{args.method} W4 (groups of {args.group_size or 'a whole row'}): wrote {args.out} "
          f"({size / 2**20:.1f} MiB of weights) in {record['seconds']} s")
    return record
