"""Helpers shared by the loss kernels: the pair-consistency edge loss and backend dispatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def edge_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−log(p_x p_y + (1−p_x)(1−p_y)) from logits, p = sigmoid.

    The pair-agreement probability equals (1 + e^{−x−y}) / ((1 + e^{−x})(1 + e^{−y})), so the loss
    is three log-sigmoids: stable for any logits, no logsumexp of two products needed.
    """
    return F.logsigmoid(x + y) - F.logsigmoid(x) - F.logsigmoid(y)


def edge_grads(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∂edge_loss/∂x and ∂edge_loss/∂y: σ(−x−y) − σ(−x) and σ(−x−y) − σ(−y)."""
    both = torch.sigmoid(-(x + y))
    return both - torch.sigmoid(-x), both - torch.sigmoid(-y)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """``auto`` picks the fused Triton kernels for CUDA tensors when triton imports, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
