"""Cross-block reconstruction regularization (CRR, WKVQuant) of 4-bit weights, trained with
learnable weight clipping (OmniQuant's LWC, ``lwc.py``).

Blocks are calibrated one after another. For block i, X̂ᵢ is its input from the blocks
already quantized and Xᵢ the full-precision model's; block i's Linear weights are
fake-quantized with learned clipping, and the loss is taken k blocks downstream:

    L = mean | F_{i+k-1} ∘ … ∘ F_{i+1} ∘ F̂ᵢ(X̂ᵢ)  -  F_{i+k-1} ∘ … ∘ Fᵢ(Xᵢ) |

(MAE, WKVQuant's; ``--loss mse`` is OmniQuant's), cut at the last block. The target is the
full-precision model's hidden state after block i+k-1, computed once for every depth. With
k = 1 this is OmniQuant's LWC alone (the ``lwc`` method: k = 1, MSE). Only block i's clipping
is trained (AdamW without weight decay, as OmniQuant's W4A16; learning rate 0.1 rather than
its 1e-2, which is sized for about 2,500 steps a block where a 2-core run affords ~10), then
block i's weights are fixed to the checkpoint's codes and X̂ᵢ₊₁ = F̂ᵢ(X̂ᵢ).

Two details could not be checked against the paper here (``shared/reference/wkvquant.md``)
and are chosen as follows: blocks i+1 .. i+k-1 run with their full-precision weights, and
the KV cache is exact while the weights train (the channel smoothing is fitted afterwards, on
the quantized model: ``python -m vllm_kvq.wkvquant smooth --model <its dequantized copy>``).
"""

import math
from dataclasses import dataclass

import torch

from .blocks import block_inputs, run_block
from .lwc import ClippedWeight
from .weights import QParams, fake_quantize, quantized_linears

LOSSES = {"mae": torch.nn.functional.l1_loss, "mse": torch.nn.functional.mse_loss}


@dataclass(frozen=True)
class CRRSettings:
    """How block-wise calibration runs (the command's flags)."""

    blocks_ahead: int = 5  # k: the loss is taken after block i + k - 1
    loss: str = "mae"
    epochs: int = 2
    lr: float = 0.1  # OmniQuant's 1e-2 is for ~2,500 steps a block; 2 cores afford ~10
    batch: int = 2  # calibration windows per step

    def __post_init__(self):
        if self.blocks_ahead < 1:
            raise ValueError(f"--blocks-ahead is {self.blocks_ahead}; allowed: 1 or more")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r} is unknown; allowed: {', '.join(LOSSES)}")
        for flag, value in (("--epochs", self.epochs), ("--batch", self.batch)):
            if value < 1:
                raise ValueError(f"{flag} is {value}; allowed: 1 or more")
        if not self.lr > 0:
            raise ValueError(f"--lr is {self.lr}; allowed: a positive number")


def _batches(hidden: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Windows of equal length stacked ``size`` at a time (every block's keyword arguments
    are the same for such windows and broadcast over the batch)."""
    return [torch.cat(hidden[i:i + size]) for i in range(0, len(hidden), size)]


def _attach(block, names: dict[int, str], group_size: int, scale_dtype: torch.dtype
            ) -> dict[str, torch.nn.Linear]:
    """Parametrize every quantized Linear of ``block`` with a ClippedWeight."""
    from torch.nn.utils import parametrize

    linears = {names[id(m)]: m for m in block.modules() if id(m) in names}
    for m in linears.values():
        parametrize.register_parametrization(
            m, "weight", ClippedWeight(m.weight, group_size, scale_dtype))
    return linears


def _freeze(linears: dict[str, torch.nn.Linear], group_size: int, scale_dtype: torch.dtype
            ) -> dict[str, QParams]:
    """Replace each parametrized weight by the checkpoint's dequantized codes under the
    learned clipping; return the clipping as qparams."""
    from torch.nn.utils import parametrize

    out = {}
    for name, m in linears.items():
        qp = m.parametrizations.weight[0].qparams()
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        m.weight.data = fake_quantize(m.weight.data.to(scale_dtype), qp, group_size).float()
        out[name] = qp
    return out


def _forward(blocks, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    for block in blocks:
        x = run_block(block, x, kwargs)
    return x


def calibrate(model, windows: list[list[int]], group_size: int, settings: CRRSettings,
              scale_dtype: torch.dtype = torch.bfloat16, progress: bool = True
              ) -> tuple[dict[str, QParams], list[dict]]:
    """CRR of every quantized Linear of a float32 transformers causal LM on the calibration
    windows (of equal length). The model's weights become the quantized ones as it goes.
    Returns each Linear's qparams and, per block, the loss of the first and last epoch."""
    from tqdm import tqdm

    if len({len(w) for w in windows}) != 1:
        raise ValueError("calibration windows must all have the same length")
    model.requires_grad_(False)
    blocks = model.model.layers
    names = {id(m): n for n, m in quantized_linears(model)}
    hidden, kwargs = block_inputs(model, windows)
    kw = kwargs[0]
    with torch.no_grad():  # the full-precision model's hidden state after every block
        states = [_batches(hidden, settings.batch)]
        for block in blocks:
            states.append([run_block(block, x, kw) for x in states[-1]])
    inputs = [x.clone() for x in states[0]]  # X̂: through the quantized blocks
    loss_fn = LOSSES[settings.loss]
    qparams, records = {}, []
    generator = torch.Generator().manual_seed(0)
    for i in tqdm(range(len(blocks)), desc="CRR blocks", disable=not progress):
        stop = min(i + settings.blocks_ahead, len(blocks))
        linears = _attach(blocks[i], names, group_size, scale_dtype)
        params = [p for m in linears.values() for p in m.parametrizations.weight.parameters()]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0)
        epoch_losses = []
        for _ in range(settings.epochs):
            total = 0.0
            for b in torch.randperm(len(inputs), generator=generator).tolist():
                loss = loss_fn(_forward(blocks[i:stop], inputs[b], kw), states[stop][b])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            epoch_losses.append(total / len(inputs))
        if not all(math.isfinite(v) for v in epoch_losses):
            raise FloatingPointError(f"block {i}: the calibration loss is not finite "
                                     f"({epoch_losses}); lower --lr")
        qparams.update(_freeze(linears, group_size, scale_dtype))
        with torch.no_grad():
            inputs = [run_block(blocks[i], x, kw) for x in inputs]
        records.append({"block": i, "loss_first_epoch": epoch_losses[0],
                        "loss_last_epoch": epoch_losses[-1]})
    return qparams, records
