"""GrabCut pseudo masks (docs/design.md §4.4, ours): OpenCV GrabCut initialised from each ground-truth box.

The classic weight-free baseline of box-supervised segmentation ("Simple Does It"). For every
annotation and every frame with a box, ``cv2.grabCut`` runs in ``GC_INIT_WITH_RECT`` mode: pixels
outside the rectangle are definite background, pixels inside are "probably foreground", and the
colour GMMs are iterated ``iterations`` times.

Details (all ours):

- **Local window.** GrabCut runs on a crop around the box (the box grown by ``context`` × its size
  on each side, at least ``min_context_px``), not on the whole frame: the background colour model
  then describes the object's surroundings, and the cost no longer grows with the frame size.
  ``context: null`` uses the whole frame.
- **Rectangle.** The box (pixels whose centres lie inside it, as the filled-box baseline), grown
  by ``margin`` pixels and clipped to the image.
- **Confidence.** GrabCut has no self-assessment, so the confidence only says whether GrabCut
  produced a result: **1.0** for a GrabCut mask, **0.0** for the fallback below. Ranking GrabCut
  masks against other sources is left to the source weight and box tightness of SHQM.
- **Fallback.** A degenerate box (width or height < 2 px after clipping), an OpenCV failure (e.g.
  no background pixels because the box covers the whole window), or an empty GrabCut result gives
  the filled box as the mask with confidence **0.0**, so SCM with any positive threshold drops it.
- **Determinism.** ``cv2.setRNGSeed(seed)`` before every call (GrabCut's GMM initialisation uses
  k-means with OpenCV's global RNG), so a mask does not depend on what ran before it.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from pmvis.models.sources._common import box_pixels, empty_tracks, filled_box_mask
from pmvis.models.sources.base import SourceConfig, SourceMasks, SourceSpec, VideoInput, register_source

NAME = "grabcut"
CONFIDENCE_GRABCUT = 1.0
CONFIDENCE_FALLBACK = 0.0
MIN_BOX_PX = 2


class GrabCutConfig(SourceConfig):
    iterations: int = Field(5, ge=1, le=100, description="GrabCut GMM/graph-cut iterations")
    margin: int = Field(0, ge=0, le=100, description="pixels added to each side of the box rectangle")
    context: float | None = Field(1.0, ge=0, description="crop = box grown by this × box size per side; "
                                                          "null: whole frame")
    min_context_px: int = Field(64, ge=0, description="the crop extends at least this far past the box")
    seed: int = Field(0, ge=0, description="cv2.setRNGSeed before every GrabCut call")


def grabcut_mask(image: np.ndarray, box: list[float], cfg: GrabCutConfig) -> tuple[np.ndarray, float]:
    """One GrabCut mask (bool (H, W)) and its confidence for one RGB uint8 frame and ``[x, y, w, h]`` box."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = box_pixels(box, H, W)
    if x1 - x0 < MIN_BOX_PX or y1 - y0 < MIN_BOX_PX:
        return filled_box_mask(box, H, W), CONFIDENCE_FALLBACK
    rx0, ry0 = max(x0 - cfg.margin, 0), max(y0 - cfg.margin, 0)
    rx1, ry1 = min(x1 + cfg.margin, W), min(y1 + cfg.margin, H)
    if cfg.context is None:
        cx0, cy0, cx1, cy1 = 0, 0, W, H
    else:
        px = max(int(round(cfg.context * (x1 - x0))), cfg.min_context_px)
        py = max(int(round(cfg.context * (y1 - y0))), cfg.min_context_px)
        cx0, cy0, cx1, cy1 = max(rx0 - px, 0), max(ry0 - py, 0), min(rx1 + px, W), min(ry1 + py, H)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
    rect = (rx0 - cx0, ry0 - cy0, rx1 - rx0, ry1 - ry0)
    gc = np.zeros(crop.shape[:2], np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(cfg.seed)
    try:
        cv2.grabCut(crop, gc, rect, bgd, fgd, cfg.iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:  # e.g. no background sample left (the box covers the whole window)
        return filled_box_mask(box, H, W), CONFIDENCE_FALLBACK
    fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if not fg.any():
        return filled_box_mask(box, H, W), CONFIDENCE_FALLBACK
    mask = np.zeros((H, W), bool)
    mask[cy0:cy1, cx0:cx1] = fg
    return mask, CONFIDENCE_GRABCUT


class GrabCutSource:
    name = NAME

    def __init__(self, config: GrabCutConfig):
        self.config = config

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        out = empty_tracks(video)
        for ann_id, boxes in video.boxes.items():
            track = out[ann_id]
            for t, box in enumerate(boxes):
                if box is None:
                    continue
                track.masks[t], track.confidences[t] = grabcut_mask(video.frames[t], box, self.config)
        return out


register_source(NAME, SourceSpec(config_cls=GrabCutConfig, build=GrabCutSource, uses_model=False))
