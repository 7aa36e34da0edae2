"""Online VIS inference as IDOL's (VNext ``idol.py`` + ``models/tracker.py``; docs/design.md §4.3).

A video is fed through the model in chunks of ``chunk_size`` frames (one batch of images per
chunk); the frames are then tracked one after the other. Every IDOL choice is an
:class:`InferenceConfig` knob with IDOL's value as the default (pmvis's first rule in brackets):

1. **Select** (:func:`select_queries`). Last decoder layer; a query's score is its maximum sigmoid
   class probability; queries with score > ``score_threshold`` are kept; if none is, the single
   best query (``top1_fallback``) [nothing].
2. **Box NMS** per argmax class (``class_aware_nms``: torchvision ``batched_nms``, IoU >
   ``box_nms_threshold`` suppressed) [across classes], then **mask NMS**: greedy by score on the
   binarised stride-4 masks (logit > 0, padding cropped), a mask whose IoU with an already kept one
   is > ``mask_nms_threshold`` is suppressed.
3. **Associate** with the memory bank (:mod:`.association`). A live track's memory embedding is
   the weighted mean of its last ``memory_length`` embeddings, weight of the k-th oldest of n =
   score_k + (k + 1)/n (``temporal_weighting: add``) [score_k · (k + 1)/n]. Bi-softmax similarity
   of detections (N, E) and tracks (K, E): ``S = (softmax_tracks(D·Tᵀ) + softmax_detections(D·Tᵀ)) / 2``
   (raw dot products). Detections in score order each take their best remaining track if S >
   ``match_threshold`` (``association: idol``) [global mutual-best], with frame weighting
   (``frame_weighting``): when several tracks pass the threshold, S × each track's matched-frame
   count (the others × the candidates' mean count), so an established track beats a young one.
4. **New tracks** from unmatched detections with score > ``new_track_score``; other unmatched
   detections are discarded.
5. **Forget.** A track unmatched for ``max_missed`` consecutive frames leaves the bank (IDOL's
   ``memo_tracklet_frames``). Its detections stay in the output, except that from frame index
   ``short_track_start_frame`` on, a track missed on the current and the previous frame with fewer
   than ``short_track_min_frames`` detections is deleted from the output (IDOL; 0: never).

Output per track: per-frame masks at the ORIGINAL frame size (stride-4 logits upsampled ×4 aligned
with the training targets' sampling, :func:`~.mask_head.upsample_aligned`, padding cropped,
bilinearly resized to the frame, logit > 0 — IDOL upsamples bilinearly without the alignment and
resizes with nearest) as compressed RLE, per-frame boxes (xyxy pixels of the original frame) and
class probabilities. Results (:meth:`Track.class_results`): one per class whose mean per-frame
probability over the track's frames is > ``class_threshold`` (``multi_class``, IDOL's
MULTI_CLS_ON), scored by that mean [one per track: the argmax class and its mean].

Inputs are resized so that the short side is ``test_short_side`` (``None``: native size, the tiny
demo) with the long side capped at ``test_max_size`` (bilinear, antialiased when shrinking, as in
training: :func:`~.idol.resize_images`), ImageNet-normalised, and zero-padded to a multiple of
``size_divisibility``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from pmvis.core.config import StrictConfig
from pmvis.core.devices import check_device
from pmvis.core.errors import PmvisError
from pmvis.core.masks import Rle, encode_mask
from pmvis.models.vis.association import MemoryBankTracker

from .boxes import cxcywh_to_xyxy
from .idol import normalize_images, resize_images
from .mask_head import upsample_aligned


class InferenceConfig(StrictConfig):
    """Every knob of online inference (defaults: IDOL, docs/design.md §4.3)."""

    chunk_size: int = Field(10, ge=1, description="frames per model forward pass (one batch)")
    score_threshold: float = Field(0.1, ge=0.0, le=1.0, description="keep queries with max class prob > this")
    box_nms_threshold: float = Field(0.9, gt=0.0, le=1.0, description="box IoU above which a lower-scored box is suppressed")
    mask_nms_threshold: float = Field(0.5, gt=0.0, le=1.0, description="mask IoU above which a lower-scored mask is suppressed")
    memory_length: int = Field(3, ge=1, description="embeddings per track kept in the memory bank")
    match_threshold: float = Field(0.5, ge=0.0, le=1.0, description="bi-softmax score a match must exceed")
    new_track_score: float = Field(0.2, ge=0.0, le=1.0, description="an unmatched detection starts a track above this")
    max_missed: int = Field(10, ge=1, description="consecutive unmatched frames after which a track leaves the bank")
    # --- IDOL's choices (VNext projects/IDOL: idol.py, models/tracker.py); each False/other = pmvis's first rule
    class_aware_nms: bool = Field(True, description="box NMS per argmax class (IDOL: batched_nms); "
                                                    "false: across classes")
    top1_fallback: bool = Field(True, description="keep the best query when none passes score_threshold (IDOL)")
    temporal_weighting: Literal["add", "multiply"] = Field(
        "add", description="memory weight = score + temporal weight (IDOL) or score × temporal weight")
    association: Literal["idol", "mutual_best"] = Field(
        "idol", description="detections in score order take their best track (IDOL), or global mutual-best")
    frame_weighting: bool = Field(True, description="IDOL's frame weighting: scores × tracks' matched-frame "
                                                    "counts when several tracks pass match_threshold")
    multi_class: bool = Field(True, description="one result per class whose mean score > class_threshold "
                                                "(IDOL's MULTI_CLS_ON); false: one result per track")
    class_threshold: float = Field(0.05, ge=0.0, le=1.0, description="IDOL's APPLY_CLS_THRES")
    short_track_min_frames: int = Field(3, ge=0, description="drop a track's output with fewer matched frames once "
                                                             "its last two frames are missed (IDOL); 0: never")
    short_track_start_frame: int = Field(9, ge=1, description="the short-track rule applies from this 0-based "
                                                              "frame index (IDOL: i_frame > 8)")
    test_short_side: int | None = Field(480, ge=4, description="resize the short side to this; null: native size")
    test_max_size: int | None = Field(1333, ge=4, description="cap on the resized long side; null: no cap")
    size_divisibility: int = Field(32, ge=4, description="pad the input to a multiple of this (multiple of 4)")
    device: str | None = Field(None, description='torch device (the model is moved there); null: where the model is')

    @model_validator(mode="after")
    def _check(self) -> "InferenceConfig":
        if self.size_divisibility % 4:
            raise ValueError(f"size_divisibility must be a multiple of the mask stride 4, got {self.size_divisibility}")
        return self


# ----------------------------------------------------------------------------- outputs


@dataclass
class Detection:
    """One track's detection on one frame."""

    score: float  # max class probability of the query
    class_scores: np.ndarray  # (C,) sigmoid class probabilities
    box: np.ndarray  # (4,) xyxy pixels of the original frame (the model's box)
    mask: Rle  # compressed RLE at the original frame size


@dataclass
class Track:
    """One predicted instance track: its detections by frame index."""

    id: int
    detections: dict[int, Detection] = field(default_factory=dict)

    @property
    def frames(self) -> list[int]:
        return sorted(self.detections)

    @property
    def mean_class_scores(self) -> np.ndarray:
        return np.mean([d.class_scores for d in self.detections.values()], axis=0)

    @property
    def label(self) -> int:
        """Class index: argmax of the mean per-frame class probabilities."""
        return int(np.argmax(self.mean_class_scores))

    @property
    def score(self) -> float:
        """Video-level score: the mean per-frame probability of :attr:`label`."""
        return float(self.mean_class_scores.max())

    def class_results(self, cfg: "InferenceConfig") -> list[tuple[int, float]]:
        """(class index, score) of the results this track gives: with ``multi_class`` every class whose
        mean per-frame probability is > ``class_threshold`` (IDOL's MULTI_CLS_ON, all sharing the
        track's masks), else only (:attr:`label`, :attr:`score`)."""
        if not cfg.multi_class:
            return [(self.label, self.score)]
        mean = self.mean_class_scores
        return [(int(c), float(mean[c])) for c in np.flatnonzero(mean > cfg.class_threshold)]

    def segmentations(self, length: int) -> list[Rle | None]:
        return [self.detections[t].mask if t in self.detections else None for t in range(length)]


# ----------------------------------------------------------------------------- NMS


def box_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, threshold: float,
            classes: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (descending score) of the boxes kept by NMS at IoU ``threshold``: among boxes of the
    same class when ``classes`` is given (IDOL's ``batched_nms`` by argmax class), else across all."""

    if boxes_xyxy.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes_xyxy.device)
    # here: torchvision takes seconds to import, training never needs it
    from torchvision.ops import batched_nms, nms

    if classes is not None:
        return batched_nms(boxes_xyxy.float(), scores.float(), classes, float(threshold))
    return nms(boxes_xyxy.float(), scores.float(), float(threshold))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(n, m)`` of binary masks ``a (n, h, w)`` and ``b (m, h, w)`` (0 for two empties)."""
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS on binary masks ``(N, h, w)``: indices (descending score) of the kept masks; a mask
    whose IoU with a kept higher-scored one is > ``threshold`` is suppressed."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = mask_iou(masks[order], masks[order]).cpu()
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


# ----------------------------------------------------------------------------- geometry


def resized_size(height: int, width: int, cfg: InferenceConfig) -> tuple[int, int]:
    """The model-input size (before padding) of a ``height`` × ``width`` frame."""
    if cfg.test_short_side is None:
        scale = 1.0
    else:
        scale = cfg.test_short_side / min(height, width)
    if cfg.test_max_size is not None and max(height, width) * scale > cfg.test_max_size:
        scale = cfg.test_max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def padded_size(height: int, width: int, divisibility: int) -> tuple[int, int]:
    return math.ceil(height / divisibility) * divisibility, math.ceil(width / divisibility) * divisibility


def prepare_images(frames: np.ndarray, size: tuple[int, int], padded: tuple[int, int],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 ``(B, H, W, 3)`` → normalised, resized to ``size``, zero-padded to ``padded``:
    images ``(B, 3, Hp, Wp)`` and padding mask ``(B, Hp, Wp)`` (True on padding)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    x = normalize_images(resize_images(x, size))
    (h, w), (hp, wp) = size, padded
    images = F.pad(x, (0, wp - w, 0, hp - h))
    mask = torch.ones(x.shape[0], hp, wp, dtype=torch.bool, device=device)
    mask[:, :h, :w] = False
    return images, mask


def masks_to_frame(logits: torch.Tensor, stride: int, size: tuple[int, int],
                   original: tuple[int, int]) -> torch.Tensor:
    """Stride-``stride`` mask logits ``(N, hp/s, wp/s)`` of the padded canvas → binary masks
    ``(N, H, W)`` of the original frame: upsample ×stride aligned with the training targets
    (:func:`upsample_aligned`), crop the padding (``size`` = the resized input), resize to
    ``original``, logit > 0."""
    if logits.shape[0] == 0:
        return torch.zeros(0, *original, dtype=torch.bool, device=logits.device)
    x = upsample_aligned(logits[:, None].float(), stride)
    x = x[:, :, : size[0], : size[1]]
    if tuple(size) != tuple(original):
        x = F.interpolate(x, size=original, mode="bilinear", align_corners=False)
    return x[:, 0] > 0


# ----------------------------------------------------------------------------- video / dataset


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def select_queries(probs: torch.Tensor, boxes_xyxy: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Steps 1–2a for one image: class probabilities ``(Q, C)`` and boxes ``(Q, 4)`` → the kept
    queries (descending score): score (max probability) > ``score_threshold``, then box NMS (per
    argmax class with ``class_aware_nms``); none passing: the single best query (``top1_fallback``,
    IDOL, no NMS) or nothing."""
    scores, classes = probs.max(-1)
    idx = torch.nonzero(scores > cfg.score_threshold).squeeze(1)
    if idx.numel():
        return idx[box_nms(boxes_xyxy[idx], scores[idx], cfg.box_nms_threshold,
                           classes[idx] if cfg.class_aware_nms else None)]
    if cfg.top1_fallback and scores.numel():
        return scores.argmax().reshape(1)
    return idx


def _select_frame(model, output, b: int, cfg: InferenceConfig, valid_stride: tuple[int, int]):
    """Steps 1–2 for image ``b`` of a chunk: kept query indices (descending score), scores, probs,
    xyxy boxes in pixels of the resized input (the model's image-normalised boxes × the image's own
    size, not the padded canvas) and stride-4 mask logits of the kept queries."""
    layer = output.num_layers - 1
    probs = output.logits[layer, b].sigmoid()  # (Q, C)
    scores = probs.max(-1).values
    h, w = output.image_sizes[b].tolist()  # boxes are normalised by the image's own (unpadded) size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=probs.device)
    boxes = cxcywh_to_xyxy(output.boxes[layer, b].float()) * scale
    idx = select_queries(probs, boxes, cfg)
    logits = model.mask_logits(output, layer, b, idx) if idx.numel() else \
        output.mask_features.new_zeros(0, *output.mask_size)
    if idx.numel():
        hv, wv = valid_stride
        keep = mask_nms(logits[:, :hv, :wv] > 0, scores[idx], cfg.mask_nms_threshold)
        idx, logits = idx[keep], logits[keep]
    return idx, scores[idx], probs[idx], boxes[idx], logits


def drop_short_tracks(tracks: dict[int, Track], t: int, cfg: InferenceConfig) -> None:
    """IDOL's short-track rule after frame ``t`` (from ``short_track_start_frame`` on): a track missed
    on frames t and t − 1 with fewer than ``short_track_min_frames`` detections is removed from the
    output. It stays in the memory bank; matched again, it restarts as a new output track."""
    if not cfg.short_track_min_frames or t < cfg.short_track_start_frame:
        return
    for tid in [tid for tid, tr in tracks.items() if t not in tr.detections and t - 1 not in tr.detections
                and len(tr.detections) < cfg.short_track_min_frames]:
        del tracks[tid]


def predict_video(model: torch.nn.Module, frames: np.ndarray, cfg: InferenceConfig | None = None) -> list[Track]:
    """Track the instances of one video: ``frames`` ``(T, H, W, 3)`` RGB uint8 → tracks (ids in
    order of creation), each with masks at ``H × W``."""
    cfg = cfg or InferenceConfig()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
    device = (check_device(cfg.device) if cfg.device else None) or _model_device(model)
    if _model_device(model) != device:
        model.to(device)
    T, H, W = frames.shape[:3]
    size = resized_size(H, W, cfg)
    padded = padded_size(*size, cfg.size_divisibility)
    stride = model.cfg.mask_stride
    valid_stride = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    sx, sy = W / size[1], H / size[0]
    to_frame = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=device)
    limit = torch.tensor([W, H, W, H], dtype=torch.float32, device=device)
    tracker = MemoryBankTracker(cfg)
    tracks: dict[int, Track] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, T, cfg.chunk_size):
                chunk = frames[start:start + cfg.chunk_size]
                images, pad_mask = prepare_images(chunk, size, padded, device)
                output = model(images, pad_mask)
                for b in range(chunk.shape[0]):
                    t = start + b
                    idx, scores, probs, boxes, logits = _select_frame(model, output, b, cfg, valid_stride)
                    ids = tracker.step(output.embeddings[b, idx], scores)
                    sel = [i for i, tid in enumerate(ids) if tid is not None]
                    if sel:
                        sel_t = torch.tensor(sel, dtype=torch.long, device=logits.device)
                        masks = masks_to_frame(logits[sel_t], stride, size, (H, W)).cpu().numpy()
                        frame_boxes = torch.minimum((boxes[sel_t] * to_frame).clamp(min=0), limit).cpu().numpy()
                        sel_scores = scores[sel_t].float().cpu().numpy()
                        sel_probs = probs[sel_t].float().cpu().numpy()
                        for k, i in enumerate(sel):
                            tid = ids[i]
                            track = tracks.setdefault(tid, Track(id=tid))
                            track.detections[t] = Detection(score=float(sel_scores[k]), class_scores=sel_probs[k],
                                                            box=frame_boxes[k], mask=encode_mask(masks[k]))
                    drop_short_tracks(tracks, t, cfg)
    finally:
        model.train(was_training)
    return [tracks[tid] for tid in sorted(tracks)]


def check_category_ids(ids: Sequence[int], dataset: Any, num_classes: int, *,
                       where: str = "category_ids") -> list[int]:
    """The class index → category id map of a model with ``num_classes`` classes: one unique id per
    class, each a category of ``dataset`` (a YTVIS dataset; None skips that check)."""
    ids = [int(i) for i in ids]
    if len(ids) != num_classes:
        raise PmvisError(f"{where}: {len(ids)} category ids {ids} for a model with {num_classes} classes")
    if len(set(ids)) != len(ids):
        raise PmvisError(f"{where}: category ids {ids} are not unique")
    if dataset is not None:
        unknown = [i for i in ids if i not in dataset.categories]
        if unknown:
            raise PmvisError(f"{where}: category ids {unknown} of the model are not categories of the dataset "
                             f"{dataset.path or ''} (it has {sorted(dataset.categories)}); "
                             f"was the checkpoint trained on another dataset?")
    return ids


def load_inference_model(path, cfg: InferenceConfig | None = None):
    """:func:`pmvis.models.vis.checkpoint.load_model` onto ``cfg.device`` (None: CUDA if available,
    else CPU) → (model, model config, checkpoint state)."""
    from .checkpoint import load_model

    cfg = cfg or InferenceConfig()
    device = (check_device(cfg.device) if cfg.device else None) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(path, device=device)
