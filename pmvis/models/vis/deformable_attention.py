"""Multi-scale deformable attention (Deformable DETR) as a weighted ``F.grid_sample`` — no custom op.

Sampling locations are normalised to [0, 1] over each level's map (x right, y down); a location's
value is the bilinear interpolation of the map with ``align_corners=False`` (pixel i covers
[i, i+1) and its centre is i + 0.5) and zero outside the map. :func:`ms_deform_attn_naive` writes
that sampling out point by point; it exists to check :func:`ms_deform_attn` in the tests.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Shapes = Sequence[tuple[int, int]]


def _split_levels(value: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} positions, the level shapes {list(shapes)} give {sum(sizes)}")
    return list(value.split(sizes, dim=1))


def ms_deform_attn(
    value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    """Σ over levels and points of weight × bilinear sample of the value maps.

    ``value``: ``(B, S, M, D)`` (S = Σ H_l·W_l, M heads of D channels); ``shapes``: the levels'
    ``(H_l, W_l)``; ``locations``: ``(B, Lq, M, L, P, 2)`` in [0, 1] (x, y); ``weights``:
    ``(B, Lq, M, L, P)``. Returns ``(B, Lq, M·D)``.
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for lvl, (v, (h, w)) in enumerate(zip(_split_levels(value, shapes), shapes)):
        v = v.permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, lq, p, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B·M, D, Lq, L·P)
    w = weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * p)
    out = (stacked * w).sum(-1).view(b, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_naive(
    value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    """Reference of :func:`ms_deform_attn` with the bilinear sampling written out per point.

    A location (x, y) ∈ [0, 1]² of an H×W map sits at pixel coordinates (x·W − ½, y·H − ½); its
    value is Σ over the 4 surrounding integer pixels of (1 − |Δx|)(1 − |Δy|)·v, a pixel outside the
    map contributing 0.
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = locations.shape
    out = value.new_zeros(b, lq, m, d)
    batch = torch.arange(b, device=value.device)[:, None, None, None]
    head = torch.arange(m, device=value.device)[None, None, :, None]
    for lvl, (v, (h, w)) in enumerate(zip(_split_levels(value, shapes), shapes)):
        v = v.view(b, h, w, m, d)
        x = locations[:, :, :, lvl, :, 0] * w - 0.5  # (B, Lq, M, P)
        y = locations[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                corner_w = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                xc = xi.clamp(0, w - 1).long()
                yc = yi.clamp(0, h - 1).long()
                corner = v[batch, yc, xc, head]  # (B, Lq, M, P, D)
                coef = corner_w * inside.to(corner_w.dtype) * weights[:, :, :, lvl]
                out = out + (corner * coef[..., None]).sum(3)
    return out.reshape(b, lq, m * d)


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention module.

    Value projection → per query, head, level and point a sampling offset and an attention weight
    (softmax over levels × points) → :func:`ms_deform_attn` → output projection.
    """

    def __init__(self, dim: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on rings of radius 1..P around the reference, one
        direction per head; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2)
        grid = grid.repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        shapes: Shapes,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query`` ``(B, Lq, C)``; ``reference_points`` ``(B, Lq, L, 2)`` (x, y) or ``(B, Lq, L, 4)``
        boxes (cx, cy, w, h), normalised; ``value`` ``(B, S, C)``; ``padding_mask`` ``(B, S)`` True
        on padding. A 2-d reference is offset by offsets / (W_l, H_l); a box by
        offsets / P × (w, h) / 2. Returns ``(B, Lq, C)``."""
        b, lq, _ = query.shape
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, value.shape[1], self.heads, self.dim // self.heads)
        offsets = self.sampling_offsets(query).view(b, lq, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, lq, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, lq, self.heads, self.levels, self.points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        return self.output_proj(ms_deform_attn(v, shapes, locations, weights))
