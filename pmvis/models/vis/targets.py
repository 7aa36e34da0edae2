"""Training targets of one frame (:class:`FrameTargets`) and the helpers that build them.

Clip layout: the criterion takes ``targets[b][t]`` for B clips × T frames, and the model's batch
holds the same B·T images clip-major (image ``b·T + t``). Frame 0 of a clip is its key frame,
frame 1 its reference frame (tracking loss). Everything spatial is at mask resolution
(stride s = 4) of the padded canvas: ``h = H/s``, ``w = W/s``. Boxes are normalised (cx, cy, w, h)
relative to the frame's own valid (unpadded) region (w_img, h_img), like the model's predictions
(Deformable DETR / IDOL normalise targets by the unpadded image size): a clip's targets do not
depend on the canvas, i.e. on the other clips of its batch; :func:`valid_sizes` reads each image's
(h_img, w_img) off the padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pmvis.kernels import rgb_to_lab


@dataclass(eq=False)
class FrameTargets:
    """The n instances annotated in one frame (instances absent from the frame are not listed).

    ``labels`` ``(n,)`` long, 0-based class index; ``boxes`` ``(n, 4)`` cxcywh normalised by the
    frame's own valid size;
    ``instance_ids`` ``(n,)`` long track ids shared by the clip's frames; ``box_masks`` ``(n, h, w)``
    float filled boxes (:func:`box_masks_from_boxes`); ``images_lab`` ``(3, h, w)`` the frame in
    LAB (:func:`lab_images`); ``valid`` ``(h, w)`` bool, False on padding and the ignored bottom
    rows (:func:`valid_masks`); ``gt_masks`` ``(n, h, w)`` (mode ``full``); ``pseudo_masks``
    ``(n, h, w)`` and ``pseudo_weights`` ``(n,)`` (mode ``pmvis``; weight 0 = no pseudo mask).
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    instance_ids: torch.Tensor
    box_masks: torch.Tensor
    images_lab: torch.Tensor
    valid: torch.Tensor
    gt_masks: torch.Tensor | None = None
    pseudo_masks: torch.Tensor | None = None
    pseudo_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if self.labels.dim() == 1 else -1
        if self.images_lab.dim() != 3 or self.images_lab.shape[0] != 3:
            raise ValueError(f"images_lab must be (3, h, w), got {tuple(self.images_lab.shape)}")
        h, w = self.images_lab.shape[1:]
        expect = {"labels": (n,), "boxes": (n, 4), "instance_ids": (n,), "box_masks": (n, h, w), "valid": (h, w),
                  "gt_masks": (n, h, w), "pseudo_masks": (n, h, w), "pseudo_weights": (n,)}
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"FrameTargets.{name} must be {shape} (n={n}, h={h}, w={w}), got {tuple(value.shape)}")
        if self.pseudo_weights is not None and self.pseudo_masks is None:
            raise ValueError("FrameTargets.pseudo_weights given without pseudo_masks")
        if self.instance_ids.unique().numel() != n:
            raise ValueError("FrameTargets.instance_ids must be unique within a frame")

    @property
    def num_instances(self) -> int:
        return self.labels.shape[0]

    @property
    def mask_size(self) -> tuple[int, int]:
        return tuple(self.images_lab.shape[1:])


def lab_images(images: torch.Tensor, stride: int) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 255] → LAB ``(B, 3, H/s, W/s)``: average-pooled by the stride,
    then converted on the device (docs/design.md §4.1)."""
    pooled = F.avg_pool2d(images.float(), kernel_size=stride, stride=stride)
    return rgb_to_lab(pooled)


def _sample(full: torch.Tensor, stride: int) -> torch.Tensor:
    """Full resolution → stride s by taking pixel (i·s + s//2, j·s + s//2) (AdelaiDet's sampling)."""
    start = stride // 2
    return full[..., start::stride, start::stride]


def valid_masks(padding_mask: torch.Tensor, stride: int, bottom_pixels: int | torch.Tensor) -> torch.Tensor:
    """``padding_mask`` ``(B, H, W)`` True on padding → ``(B, H/s, W/s)`` bool valid pixels, with the
    bottom rows of each image's unpadded part also invalid (BoxInst's ``bottom_pixels_removed``):
    ``bottom_pixels`` rows for every image, or ``(B,)`` rows per image (AdelaiDet scales the
    configured count by each image's resize factor, :meth:`ClipBatch.targets`)."""
    valid = ~padding_mask.to(torch.bool)
    removed = torch.as_tensor(bottom_pixels, device=valid.device).long().expand(valid.shape[0])
    if bool((removed > 0).any()):
        heights = valid.any(2).sum(1)  # unpadded rows per image
        rows = torch.arange(valid.shape[1], device=valid.device)
        valid = valid & (rows[None, :] < (heights - removed)[:, None])[:, :, None]
    return _sample(valid, stride)


def mask_targets(masks: torch.Tensor, stride: int, sampling: str = "point") -> torch.Tensor:
    """Full-resolution masks ``(n, H, W)`` → float ``(n, H/s, W/s)`` targets for stride-s logits.

    ``point`` (CondInst/AdelaiDet): the pixel (i·s + s//2, j·s + s//2), 0 or 1. ``area``: the
    share of the s×s window centred on that pixel's centre that the mask covers (in [0, 1]; the
    window's edge pixels count half) — a soft target that keeps where the boundary falls inside a
    cell, which a point sample loses. Both put cell (i, j) at the same place, so predictions are
    upsampled the same way (:func:`~pmvis.models.vis.mask_head.upsample_aligned`). Measured on the
    synthetic data (16–40 px objects, s = 4): the true masks through point targets and back have
    mean IoU 0.74 with themselves, through area targets 0.81 (benchmarks/README.md).
    """
    if sampling == "point":
        return _sample(masks, stride).to(torch.float32)
    if sampling != "area":
        raise ValueError(f"mask target sampling must be 'point' or 'area', got {sampling!r}")
    k = torch.ones(stride + 1, dtype=torch.float32, device=masks.device)
    k[0] = k[-1] = 0.5
    k = k / stride
    x = F.pad(masks.to(torch.float32)[:, None], (0, 1, 0, 1))  # past the canvas: background
    return F.conv2d(x, (k[:, None] * k[None, :])[None, None], stride=stride)[:, 0]


def valid_sizes(padding_mask: torch.Tensor) -> torch.Tensor:
    """``padding_mask`` ``(B, H, W)`` True on padding (each image top-left on its canvas) →
    ``(B, 2)`` long (h, w): the valid rows of the first column and the valid columns of the first
    row, as Deformable DETR's ``get_valid_ratio`` counts them."""
    valid = ~padding_mask.to(torch.bool)
    return torch.stack((valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)), dim=1)


def box_masks_from_boxes(boxes: torch.Tensor, image_size: tuple[int, int], stride: int,
                         canvas_size: tuple[int, int] | None = None) -> torch.Tensor:
    """cxcywh ``(n, 4)`` normalised by ``image_size`` (h_img, w_img) → ``(n, H/s, W/s)`` float
    filled boxes on the ``canvas_size`` (H, W) canvas (default: the image itself): a mask pixel is
    inside when the centre (j·s + s//2 + ½) of the full-resolution pixel it samples lies in the box
    in pixels (box × the image's own size)."""
    img_h, img_w = image_size
    can_h, can_w = image_size if canvas_size is None else canvas_size
    h, w = can_h // stride, can_w // stride
    cx, cy, bw, bh = boxes.float().unbind(-1)
    x0, x1 = (cx - bw / 2) * img_w, (cx + bw / 2) * img_w
    y0, y1 = (cy - bh / 2) * img_h, (cy + bh / 2) * img_h
    px = torch.arange(w, device=boxes.device) * stride + stride // 2 + 0.5
    py = torch.arange(h, device=boxes.device) * stride + stride // 2 + 0.5
    inside_x = (px[None] >= x0[:, None]) & (px[None] <= x1[:, None])
    inside_y = (py[None] >= y0[:, None]) & (py[None] <= y1[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(torch.float32)
