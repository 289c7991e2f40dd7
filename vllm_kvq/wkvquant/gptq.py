"""GPTQ (Frantar et al., 2023): 4-bit weights that compensate each column's rounding error on
the columns not yet quantized, weighted by the layer's input second moments.

For a Linear y = W x with calibration inputs X, GPTQ minimizes ||W X - Q X||^2 column by
column: H = 2 X X^T / n (+ damping), and with U the upper Cholesky factor of H^-1, quantizing
column j to q_j moves the remaining columns by -(w_j - q_j) / U_jj * U_j,(j+1:). Groups of
``group_size`` input channels get their scale and zero point from their range when their
first column is reached (after the updates so far), on the checkpoint's own grid
(``weights.rtn_qparams``: compressed-tensors' qparams, bf16 scales), so the codes GPTQ picks
are the codes the checkpoint stores.

Decoder layers are quantized in order, each from the inputs the already quantized layers
before it produce (sequential, as in the paper). Within a decoder layer every Linear's
Hessian comes from one pass of the layer before any of them is quantized (o_proj and
down_proj see the unquantized projections before them: GPTQ's non-"true-sequential" mode).
"""

import torch

from .blocks import block_inputs, run_block
from .weights import Q_MAX, Q_MIN, QParams, quantized_linears, rtn_qparams



def hessian_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float64 for stability."""
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """One column on the checkpoint's grid (what compressed-tensors' quantize computes)."""
    q = torch.clamp(torch.round(w / scale + zero_point), Q_MIN, Q_MAX)
    return (q - zero_point) * scale


def gptq(weight: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01,
         scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, QParams]:
    """GPTQ of one weight ``[out, in]`` given its input Hessian ``[in, in]``: the quantized
    weight (float32, on the grid of ``scale_dtype`` scales, the checkpoint's) and its
    qparams."""
    w = weight.double().clone()
    cols = w.shape[1]
    dead = h.diagonal() == 0  # inputs never active: any value is as good
    h = h.clone()
    h[dead, dead] = 1
    w[:, dead] = 0
    u = hessian_inverse_factor(h, damp)
    g = group_size or cols
    scales, zero_points = [], []
    for start in range(0, cols, g):
        stop = start + g
        qp = rtn_qparams(w[:, start:stop].to(scale_dtype), 0)
        scale, zp = qp.scale.double(), qp.zero_point.double()
        scales.append(qp.scale)
        zero_points.append(qp.zero_point)
        block = w[:, start:stop]
        errors = torch.zeros_like(block)
        for j in range(g):
            q = quantize_column(block[:, j:j + 1], scale, zp)
            err = (block[:, j:j + 1] - q) / u[start + j, start + j]
            block[:, j:] -= err @ u[start + j:start + j + 1, start + j:stop]
            block[:, j:j + 1] = q
            errors[:, j:j + 1] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w.float(), QParams(torch.cat(scales, 1), torch.cat(zero_points, 1))


@torch.no_grad()
def sequential_gptq(model, windows: list[list[int]], group_size: int, damp: float = 0.01,
                    progress: bool = True) -> dict[str, tuple[torch.Tensor, QParams]]:
    """GPTQ of every quantized Linear of a (float32) transformers causal LM, decoder layer by
    decoder layer on the calibration windows. The model's weights are replaced by the
    quantized ones as it goes; returns {name: (quantized weight, qparams)}."""
    from tqdm import tqdm

    layers = model.model.layers
    hidden, kwargs = block_inputs(model, windows)
    names = {id(m): n for n, m in quantized_linears(model)}
    out: dict[str, tuple[torch.Tensor, QParams]] = {}
    for layer in tqdm(layers, desc="GPTQ layers", disable=not progress):
        linears = [(names[id(m)], m) for m in layer.modules() if id(m) in names]
        sums = {name: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64), 0]
                for name, m in linears}
        hooks = [m.register_forward_pre_hook(_accumulate(sums[name])) for name, m in linears]
        try:
            for x, kw in zip(hidden, kwargs):
                layer(x, **kw)
        finally:
            for hk in hooks:
                hk.remove()
        for name, m in linears:
            total, count = sums[name]
            q, qp = gptq(m.weight.data, 2 * total / count, group_size, damp)
            m.weight.data = q.to(m.weight.dtype)
            out[name] = (q, qp)
        hidden = [run_block(layer, x, kw) for x, kw in zip(hidden, kwargs)]
    return out


def _accumulate(acc: list):
    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        acc[0] += x.T @ x
        acc[1] += x.shape[0]
    return hook
