"""CondInst dynamic mask heads: a shared mask-feature branch + per-query dynamic 1×1 convs.

Two branches (``model.mask_head``):

* ``idol`` (:class:`IdolMaskHead`, weight-compatible with VNext IDOL's ``MaskHeadSmallConv``):
  plain 3×3 convs over the stride-8/16/32 encoder memory, no normalisation, ``mask_channels``
  features at stride 8; the dynamic convs run at stride 8 on [relative coordinates ‖ features]
  and their logits are upsampled ×2 to stride 4 (:func:`upsample_aligned`, IDOL's
  ``aligned_bilinear``). Relative coordinates, as IDOL: the reference point the decoder layer
  took as input (layer 0: the initial point; layer l: the detached box of layer l − 1), times the
  image's own (unpadded) size, minus the pixel centre — raw pixel offsets (÷ ``rel_coords_scale``).
* ``fpn`` (:class:`MaskBranch`, pmvis's first branch): the encoder memory fused top-down
  FPN-style into the finest level, upsampled (bilinear) to stride 4 and added to a 1×1 lateral of
  the backbone's stride-4 feature; 3×3 conv + GN + ReLU tower; 1×1 conv to ``mask_channels``. The
  dynamic convs run at stride 4 on [features ‖ relative coordinates]; the coordinates are (the
  centre of the box the same decoder layer predicts, detached) − pixel centre / (w_img, h_img), or
  pixel offsets ÷ ``rel_coords_scale`` when set (CondInst divides by a per-level size of interest).

Controller: an MLP on a query's decoder output → the weights, then the biases, of the dynamic
convs. Only the selected queries are evaluated (training: the matched ones; inference: the kept
ones), so memory is O(N·h·w), not O(Q·h·w). Pixel (i, j) of a stride-s map has its centre at
(j·s + s//2, i·s + s//2) pixels (CondInst's locations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP


def _conv_gn_relu(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU())


class MaskBranch(nn.Module):
    """Encoder memory maps (fine → coarse) + stride-4 backbone feature → ``(B, Cm, H/4, W/4)``."""

    def __init__(self, *, memory_dim: int, levels: int, stride4_channels: int, channels: int, convs: int,
                 out_channels: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(memory_dim, channels, 1) for _ in range(levels))
        self.smooth = nn.ModuleList(_conv_gn_relu(channels, channels, groups) for _ in range(levels - 1))
        self.lateral = nn.Conv2d(stride4_channels, channels, 1)
        self.tower = nn.Sequential(*(_conv_gn_relu(channels, channels, groups) for _ in range(convs)))
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, memory_maps: list[torch.Tensor], stride4: torch.Tensor) -> torch.Tensor:
        x = self.reduce[-1](memory_maps[-1])
        for lvl in range(len(memory_maps) - 2, -1, -1):
            fine = self.reduce[lvl](memory_maps[lvl])
            x = self.smooth[lvl](fine + F.interpolate(x, size=fine.shape[-2:], mode="bilinear", align_corners=False))
        x = self.lateral(stride4) + F.interpolate(x, size=stride4.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.tower(x))


def pixel_locations(height: int, width: int, stride: int, *, device, dtype) -> torch.Tensor:
    """``(2, h, w)``: the (x, y) pixel centres (j·s + s//2, i·s + s//2) of the stride-``stride``
    map's pixels (CondInst's ``compute_locations``)."""
    xs = torch.arange(width, device=device, dtype=dtype) * stride + stride // 2
    ys = torch.arange(height, device=device, dtype=dtype) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy))


def split_params(params: torch.Tensor, dims: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(N, P)`` → per layer (weights ``(N, out, in)``, biases ``(N, out)``); weights first, then
    biases (CondInst's layout)."""
    n = params.shape[0]
    w_sizes = [i * o for i, o in zip(dims[:-1], dims[1:])]
    b_sizes = list(dims[1:])
    chunks = params.split(w_sizes + b_sizes, dim=1)
    layers = len(w_sizes)
    return [(chunks[k].view(n, dims[k + 1], dims[k]), chunks[layers + k]) for k in range(layers)]


def dynamic_mask_logits(
    mask_features: torch.Tensor,
    params: torch.Tensor,
    centres: torch.Tensor | None,
    batch_idx: torch.Tensor,
    *,
    dims: list[int],
    stride: int,
    image_sizes: torch.Tensor,
    coord_scale: float | None = None,
    coords_first: bool = False,
) -> torch.Tensor:
    """Evaluate the dynamic convs of N selected queries → ``(N, h, w)`` mask logits.

    ``mask_features`` ``(B, Cm, h, w)``; ``params`` ``(N, P)``; ``centres`` ``(N, 2)`` (cx, cy)
    normalised by the query's image size, or None without relative coordinates; ``batch_idx``
    ``(N,)`` the image of each query; ``image_sizes`` ``(N, 2)`` (h_img, w_img) of each query's
    image (its valid, unpadded size). Relative coordinate of a pixel: centre − pixel centre /
    (w_img, h_img); with ``coord_scale``: (centre·(w_img, h_img) − pixel centre) / coord_scale,
    i.e. pixel offsets in units of ``coord_scale`` pixels (IDOL: 1). ``coords_first``: the two
    coordinate channels come before the mask features (IDOL's order; CondInst's is after).
    """
    n = params.shape[0]
    _, _, h, w = mask_features.shape
    x = mask_features[batch_idx].flatten(2)  # (N, Cm, h·w)
    if centres is not None:
        loc = pixel_locations(h, w, stride, device=x.device, dtype=x.dtype).flatten(1)  # (2, h·w) pixels
        size_xy = image_sizes.to(device=x.device, dtype=x.dtype).reshape(n, 2).flip(-1)  # (N, 2) (w, h)
        if coord_scale is None:
            rel = centres.to(x.dtype)[:, :, None] - loc[None] / size_xy[:, :, None]
        else:
            rel = ((centres.to(x.dtype) * size_xy)[:, :, None] - loc[None]) / coord_scale
        x = torch.cat((rel, x) if coords_first else (x, rel), 1)
    layers = split_params(params, dims)
    for k, (weight, bias) in enumerate(layers):
        x = torch.baddbmm(bias[:, :, None], weight, x)
        if k < len(layers) - 1:
            x = F.relu(x)
    return x.view(n, h, w)


class Controller(nn.Module):
    """3-layer MLP: decoder output ``(…, C)`` → dynamic-conv parameters ``(…, P)`` (Xavier, zero
    biases, as IDOL)."""

    def __init__(self, dim: int, num_params: int) -> None:
        super().__init__()
        self.mlp = MLP(dim, dim, num_params, 3)
        for layer in self.mlp.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)


def upsample_aligned(logits: torch.Tensor, stride: int) -> torch.Tensor:
    """``(N, 1, h, w)`` → ``(N, 1, h·s, w·s)`` with cell (i, j) at pixel (i·s + s//2, j·s + s//2)
    of the finer grid: CondInst's / IDOL's ``aligned_bilinear`` (pad right/bottom by one, bilinear
    to (h·s + 1, w·s + 1) with ``align_corners=True``, pad left/top by s//2, crop). A plain ×s
    bilinear upsampling (``align_corners=False``) would put the cell half a pixel up-left of it."""
    if stride == 1:
        return logits
    h, w = logits.shape[-2:]
    x = F.pad(logits, (0, 1, 0, 1), mode="replicate")  # the last cell's right/bottom neighbour
    x = F.interpolate(x, size=(h * stride + 1, w * stride + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (stride // 2, 0, stride // 2, 0), mode="replicate")  # cell (0, 0) → pixel (s//2, s//2)
    return x[..., : h * stride, : w * stride]


class IdolMaskHead(nn.Module):
    """IDOL's mask-feature branch (VNext ``MaskHeadSmallConv`` with ``fpn_dims=None``), weight-compatible
    with its checkpoints: plain 3×3 convs with bias and ReLU, no normalisation, over the encoder
    memory of the stride-8/16/32 levels (the stride-64 level is unused):

        f = relu(lay3(m32)); f = relu(lay4(m16 + up(f))); f = relu(dcn(m8 + up(f)))
        features = relu(lay2(relu(lay1(f))))      # (B, mask_channels, H/8, W/8)

    with ``up`` nearest upsampling to the finer map's size. (IDOL names the last fusion conv ``dcn``
    though it is an ordinary conv.) The dynamic convs then run at stride 8 and their logits are
    upsampled ×2 to stride 4 (:func:`upsample_aligned`)."""

    def __init__(self, dim: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lay1 = nn.Conv2d(dim, mid_channels, 3, padding=1)
        self.lay2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)
        self.lay3 = nn.Conv2d(dim, dim, 3, padding=1)
        self.lay4 = nn.Conv2d(dim, dim, 3, padding=1)
        self.dcn = nn.Conv2d(dim, dim, 3, padding=1)
        for m in self.modules():  # IDOL: kaiming_uniform_(a=1), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, memory_maps: list[torch.Tensor]) -> torch.Tensor:
        """``memory_maps``: the encoder memory at strides 8, 16, 32 (fine → coarse)."""
        if len(memory_maps) != 3:
            raise ValueError(f"the IDOL mask head takes the stride-8/16/32 memory maps, got {len(memory_maps)}")
        m8, m16, m32 = memory_maps
        f = F.relu(self.lay3(m32))
        f = F.relu(self.lay4(m16 + F.interpolate(f, size=m16.shape[-2:], mode="nearest")))
        f = F.relu(self.dcn(m8 + F.interpolate(f, size=m8.shape[-2:], mode="nearest")))
        return F.relu(self.lay2(F.relu(self.lay1(f))))
