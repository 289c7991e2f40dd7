"""Seeded random matrices, one per (seed, layer, global KV head).

Every random quantity is a pure function of (seed, layer index, global KV-head index, purpose),
drawn from an explicit ``torch.Generator`` on the CPU. It never touches global RNG state (vLLM
reseeds workers), so a head's matrices are identical on every tensor-parallel rank, at every
TP size, and across restarts. That is what lets packed blocks move between instances.
"""

import hashlib
import math

import torch


def head_generator(seed: int, layer: int, head: int, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"vllm-kvq:{seed}:{layer}:{head}:{purpose}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation(seed: int, layer: int, head: int, dim: int) -> torch.Tensor:
    """Orthogonal ``[dim, dim]`` matrix R; a vector x is stored rotated as R @ x.

    Power-of-two dims get a randomized Hadamard transform H·diag(s)/sqrt(dim) (spreads every
    channel outlier evenly over all coordinates, and is cheap in a kernel); other dims get a
    Haar-random orthogonal matrix from the QR of a Gaussian.
    """
    gen = head_generator(seed, layer, head, "rotation")
    if dim & (dim - 1) == 0:
        signs = torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1
        return _sylvester_hadamard(dim) * signs / math.sqrt(dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def qjl_projection(seed: int, layer: int, head: int, sketch_dim: int, dim: int) -> torch.Tensor:
    """QJL sketch matrix S ``[sketch_dim, dim]`` with rows orthogonal in blocks of ``dim``.

    Each block of ``dim`` rows is the Q factor of a Gaussian block (Haar-uniform directions),
    and each row keeps the length of the Gaussian row it came from (chi distributed, about
    sqrt(dim)). Every row is therefore exactly N(0, I) in distribution, so
    E[sign(<s,k>) <s,q>] = sqrt(2/pi) <q,k> / ||k|| holds exactly and the estimator stays
    unbiased, while orthogonal rows inside a block lower its variance.
    """
    gen = head_generator(seed, layer, head, "qjl")
    rows = []
    for start in range(0, sketch_dim, dim):
        n = min(dim, sketch_dim - start)
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))  # Haar-uniform
        lengths = g.norm(dim=1, keepdim=True)
        rows.append((q.T * lengths)[:n])
    return torch.cat(rows).float()
