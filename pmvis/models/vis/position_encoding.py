"""DETR's sine position encoding, normalised over the valid (unpadded) region of each image."""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    padding_mask: torch.Tensor, dim: int, *, temperature: float = 10000.0, scale: float = 2 * math.pi,
) -> torch.Tensor:
    """``padding_mask`` ``(B, H, W)`` (True on padding) → ``(B, dim, H, W)``: dim/2 channels for y
    then dim/2 for x, interleaved sin/cos of the cumulative valid position (Deformable DETR's
    normalisation: (cumsum − ½) / valid extent × 2π)."""
    not_mask = (~padding_mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps = 1e-6
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    feats = dim // 2
    t = torch.arange(feats, dtype=torch.float32, device=padding_mask.device)
    t = temperature ** (2 * torch.div(t, 2, rounding_mode="floor") / feats)
    px = x[..., None] / t
    py = y[..., None] / t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
