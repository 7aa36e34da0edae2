"""Box-supervised VIS model pseudo masks (docs/design.md §4.4): a pmvis-trained IDOL-BoxInst checkpoint
run on the training videos, its predictions matched to the ground-truth boxes.

Per video: :func:`pmvis.models.vis.inference.predict_video` (online tracking; the
:class:`~pmvis.models.vis.inference.InferenceConfig` knobs under ``inference:``). Then per frame,
independently:

- **Predictions** are the tracks present on the frame: their mask at the frame size, their class
  (the track's video-level class, argmax of the mean class probabilities, mapped to a category id
  by the checkpoint's ``category_ids``) and their score on this frame (the frame's probability of
  that class).
- **Matching:** each prediction goes to the SAME-category GT box (of the annotations that have a
  box on this frame) with the highest GIoU between the GT box and the tight box of the predicted
  mask, if that GIoU is > 0 (:func:`match_to_gt`). An empty predicted mask has no box and matches
  nothing. Several predictions may go to one GT box.
- **Mask:** the union of the masks assigned to an annotation, with DOOB (every pixel outside the
  GT box zeroed, :func:`pmvis.models.fusion.doob`).
- **Confidence:** the MAX frame score of the assigned predictions (the best supporting
  detection), clipped to [0, 1].
- **No mask** (``None``): frames where the annotation has no box, frames where no prediction was
  assigned to it, and frames where the union is empty after DOOB.

The checkpoint is required (a model trained box-only by `pmvis train`, loaded with
``weights_only=True``); its ``extra["category_ids"]`` maps class index → category id. A
checkpoint without them needs ``category_ids:`` in the source options.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from pmvis.core.errors import PmvisError
from pmvis.models.sources._common import clip01, empty_tracks, resolve_device
from pmvis.models.sources.base import SourceConfig, SourceMasks, SourceSpec, VideoInput, register_source

NAME = "boxinst"
log = logging.getLogger("pmvis.sources.boxinst")


class BoxInstSourceConfig(SourceConfig):
    checkpoint: str | None = Field(None, description="REQUIRED: a pmvis checkpoint trained box-only (`pmvis train`)")
    device: str | None = Field(None, description='null: "cuda" if num_gpus > 0 and CUDA is available, else "cpu"')
    category_ids: list[int] | None = Field(
        None, description="class index -> category id; null: the checkpoint's recorded category_ids")
    # InferenceConfig knobs (pmvis.models.vis.inference). A plain dict here so that importing the
    # source registry does not import torch; validated (and completed with the defaults) on load.
    inference: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                      description="InferenceConfig knobs; its device comes from `device`")

    @field_validator("inference", mode="before")
    @classmethod
    def _inference_knobs(cls, value: Any) -> dict[str, Any]:
        from pmvis.core.config import build_config
        from pmvis.models.vis.inference import InferenceConfig

        return build_config(InferenceConfig, value or {}, source="source boxinst: inference").model_dump(mode="json")

    @model_validator(mode="after")
    def _require_checkpoint(self) -> "BoxInstSourceConfig":
        # PmvisError (not ValueError) passes through pydantic unchanged: the CLI prints it cleanly.
        if not self.checkpoint:
            raise PmvisError("source boxinst: `checkpoint` is required — a pmvis checkpoint of a model trained "
                             "box-only (pmvis train), e.g. --option boxinst.checkpoint=/runs/boxinst/checkpoint.pt")
        return self


def _xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def mask_box_xyxy(mask: np.ndarray) -> list[float] | None:
    """Tight ``[x0, y0, x1, y1]`` box (exclusive ends) of a binary mask; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def match_to_gt(pred_boxes: np.ndarray, pred_categories: Sequence[int], gt_boxes: np.ndarray,
                gt_categories: Sequence[int]) -> np.ndarray:
    """For each prediction (xyxy ``(N, 4)``) the index of the same-category GT box (xyxy ``(M, 4)``)
    with the highest GIoU if that GIoU is > 0, else -1. ``(N,)`` int."""
    import torch

    from pmvis.models.vis.boxes import generalized_box_iou

    n, m = len(pred_boxes), len(gt_boxes)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or m == 0:
        return out
    giou = generalized_box_iou(torch.as_tensor(np.asarray(pred_boxes, np.float64).reshape(n, 4)),
                               torch.as_tensor(np.asarray(gt_boxes, np.float64).reshape(m, 4))).numpy()
    same = np.asarray(pred_categories)[:, None] == np.asarray(gt_categories)[None, :]
    giou = np.where(same, giou, -np.inf)
    best = giou.argmax(1)
    ok = giou[np.arange(n), best] > 0
    out[ok] = best[ok]
    return out


def assign_frame(masks: Sequence[np.ndarray], categories: Sequence[int], scores: Sequence[float],
                 gt: dict[int, tuple[Sequence[float], int]]) -> dict[int, tuple[np.ndarray, float]]:
    """One frame: predicted masks (bool ``(H, W)``), their category ids and scores; ``gt`` maps
    annotation id → (``[x, y, w, h]`` box, category id). Returns annotation id → (DOOB-cleaned union
    of its assigned masks, max assigned score) for the annotations that got a non-empty mask."""
    from pmvis.models.fusion import doob

    boxes, keep = [], []
    for i, m in enumerate(masks):
        b = mask_box_xyxy(m)
        if b is not None:
            boxes.append(b)
            keep.append(i)
    ann_ids = list(gt)
    match = match_to_gt(np.array(boxes, dtype=np.float64).reshape(-1, 4), [categories[i] for i in keep],
                        np.array([_xywh_to_xyxy(gt[a][0]) for a in ann_ids], dtype=np.float64).reshape(-1, 4),
                        [gt[a][1] for a in ann_ids])
    out: dict[int, tuple[np.ndarray, float]] = {}
    for g, aid in enumerate(ann_ids):
        assigned = [keep[k] for k in np.flatnonzero(match == g)]
        if not assigned:
            continue
        union = np.logical_or.reduce([np.asarray(masks[i], dtype=bool) for i in assigned])
        union = doob(union, gt[aid][0])
        if union.any():
            out[aid] = (union, clip01(max(float(scores[i]) for i in assigned)))
    return out


class BoxInstSource:
    name = NAME

    def __init__(self, config: BoxInstSourceConfig):
        from pmvis.models.vis.checkpoint import load_model
        from pmvis.models.vis.inference import InferenceConfig, check_category_ids

        self.config = config
        self.device = resolve_device(config.device, config.num_gpus)
        self.model, self.model_cfg, state = load_model(config.checkpoint, device=self.device)
        ids = config.category_ids
        if ids is None:
            ids = (state.get("extra") or {}).get("category_ids")
        if ids is None:
            raise PmvisError(f"source boxinst: checkpoint {state['path']} records no category_ids (class index -> "
                             f"category id); set them, e.g. --option 'boxinst.category_ids=[1, 2, 3]'")
        self.category_ids = check_category_ids(ids, None, self.model_cfg.num_classes,
                                               where=f"source boxinst: checkpoint {state['path']}")
        self.inference = InferenceConfig.model_validate({**config.inference, "device": self.device})

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        from pmvis.core.masks import decode_mask
        from pmvis.models.vis.inference import predict_video

        out = empty_tracks(video)
        missing = sorted({c for c in video.categories.values() if c not in self.category_ids})
        if missing and len(missing) == len(set(video.categories.values())):
            log.warning("video id=%s: none of its categories %s is a class of the boxinst checkpoint %s",
                        video.video_id, missing, self.category_ids)
        if not any(b is not None for boxes in video.boxes.values() for b in boxes):
            return out
        tracks = predict_video(self.model, video.frames, self.inference)
        for t in range(video.length):
            gt = {aid: (boxes[t], video.categories.get(aid)) for aid, boxes in video.boxes.items()
                  if boxes[t] is not None}
            present = [tr for tr in tracks if t in tr.detections]
            if not gt or not present:
                continue
            masks = [decode_mask(tr.detections[t].mask) for tr in present]
            cats = [self.category_ids[tr.label] for tr in present]
            scores = [float(tr.detections[t].class_scores[tr.label]) for tr in present]
            for aid, (mask, conf) in assign_frame(masks, cats, scores, gt).items():
                out[aid].masks[t] = mask
                out[aid].confidences[t] = conf
        return out


register_source(NAME, SourceSpec(BoxInstSourceConfig, BoxInstSource, uses_model=True))
