"""PM-VIS pseudo-mask supervision: sigmoid focal + dice against pseudo masks (IDOL's mask losses).

Normalisation (as IDOL / DETR): the focal term is each instance's mean over its pixels, the dice
term is 1 − (2Σpq + 1)/(Σp + Σq + 1) per instance; both are summed over instances, each multiplied
by the instance's weight (mask quality, default 1), and divided by the number of instances N (not by
Σ weights), so a low-quality pseudo mask really contributes less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss (RetinaNet); ``alpha < 0`` disables the class balance."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def pseudo_mask_loss(
    mask_logits: torch.Tensor,
    pseudo_masks: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_weight: float = 2.0,
    dice_weight: float = 5.0,
    return_terms: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``focal_weight``·focal + ``dice_weight``·dice of ``mask_logits`` against ``pseudo_masks``.

    Both ``(N, ...)`` (e.g. ``(N, H, W)`` or ``(N, T, H, W)``), targets in [0, 1]; ``weights``: ``(N,)``.
    ``return_terms=True`` returns ``{"loss", "focal", "dice"}`` (the terms already weighted).
    """
    if pseudo_masks.shape != mask_logits.shape or mask_logits.dim() < 2:
        raise ValueError(f"mask_logits {tuple(mask_logits.shape)} and pseudo_masks "
                         f"{tuple(pseudo_masks.shape)} must both be (N, ...)")
    n = mask_logits.shape[0]
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must be ({n},), got {tuple(weights.shape)}")
    if n == 0:
        zero = mask_logits.sum() * 0.0
        return {"loss": zero, "focal": zero, "dice": zero} if return_terms else zero
    x = mask_logits.reshape(n, -1)
    t = pseudo_masks.reshape(n, -1).to(x.dtype)
    p = x.sigmoid()
    focal = sigmoid_focal_loss(x, t, focal_alpha, focal_gamma).mean(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    if weights is not None:
        w = weights.to(x.dtype)
        focal, dice = focal * w, dice * w
    focal = focal_weight * focal.sum() / n
    dice = dice_weight * dice.sum() / n
    loss = focal + dice
    return {"loss": loss, "focal": focal, "dice": dice} if return_terms else loss
