"""Track pseudo masks (PM-VIS, docs/design.md §4.4): propagate each instance's best mask through its video.

For every annotation:

1. **Key frame.** Its best init mask — the highest-confidence non-empty mask in
   ``video.init_masks[ann_id]`` (the masks of the ``init_from`` source, HQ-SAM by default; ties go
   to the earliest frame) — and that mask's frame (``select_key_frame``).
   **Fallback (ours):** an annotation without a usable init mask starts from its filled
   ground-truth box on the frame where its box is largest (earliest on ties); one without any box
   is not tracked (all ``None``).
2. **Tracking.** Instances are grouped by key frame; each group is one tracker session initialised
   with every member's key-frame mask, propagated FORWARD from the key frame to the last frame and
   BACKWARD to the first. Grouping gives every instance exactly "its key frame, then forward and
   backward", which one session cannot do when key frames differ (a single forward pass from the
   earliest key frame would run later-keyed objects before their own key frame).
3. **Output.** A mask on EVERY frame where the tracker says the object is present — also where
   the ground-truth box is null (the Missing-Data filter relies on it) — and ``None`` elsewhere.

Engines:

- ``sam2`` (default): ``sam2.build_sam.build_sam2_video_predictor(sam2_config, ckpt_path=None)``,
  then the ``checkpoint`` (state dict under ``"model"``) loaded here with
  ``torch.load(weights_only=True)`` and strict key/shape checks; without one, random weights and a
  loud warning. Confidence = sigmoid of SAM 2's object-score logit for that object and frame;
  present = that logit > 0 (SAM 2's own rule) and a non-empty mask (logits > 0). On the key frame
  the output is the seed mask itself (SAM 2 only copies it onto its coarser grid there), with
  SAM 2's confidence for it (sigmoid(+10) for a non-empty mask input). It runs on CPU
  (no autocast is used on this path). SAM 2's small-hole filling needs its CUDA extension, which
  this project builds without (pyproject), so it is switched off (``fill_hole_area = 0``) instead
  of warning and skipping.
- ``deaot``: ``pmvis.models.sources.deaot.DeAOTPropagator`` over a user's aot-benchmark checkout.
- ``flow`` (weight-free, CPU; the optical-flow baseline MaskFreeVIS compares TK-Loss against):
  OpenCV DIS dense flow between neighbouring frames (both directions, computed once per video)
  carries the mask one frame at a time: each pixel of the new frame looks up, through the
  backward flow, whether it came from the previous mask (bilinear warp, ≥ 0.5); where the frame
  has a GT box the mask is cut to it (grown by ``flow_box_margin`` px), so drift is not carried
  on. Each step's tracking score = the fraction of new-mask pixels whose forward–backward flow
  round trip closes within ``flow_fb_tolerance`` px × the fraction of old-mask pixels that land
  (forward flow) on the new mask × appearance (RGB-histogram intersection with the key-frame
  mask). **Large moves (ours):** dense flow on small frames loses an object that moves more than
  its own size between frames (the synthetic data's fastest objects move 40 px a frame at 16 px);
  so each step also tries the whole mask translated by masked template matching (least mean
  squared RGB difference within ``flow_search`` object sizes, kept only when matching back returns
  within ``flow_fb_tolerance`` px) and keeps that candidate, cut to the box, when its appearance
  beats the flow's tracking score. Propagation in a direction stops when the score falls below
  ``flow_present_threshold`` (lost). Confidence = tracking score × box agreement (IoU of the
  mask's tight box with the GT box; 1 where the frame has none); a mask is reported where it is ≥
  the threshold. ``benchmarks/track.py`` on the demo's data (seeds 0/1/2, 24 videos) and on 60
  videos (seed 2), flow alone → with template matching: masks on 54–60 % → 69–81 % of the
  annotated frames, mean IoU with the truth over them 0.36–0.40 → 0.47–0.58; the demo's
  Missing-Data filter, recall 0.57–0.69 → 0.77–0.87 at precision 0.83–1.00 → 0.87–1.00. An object
  that vanishes leaves no consistent flow, no match that maps back and no matching colours: the
  Missing-Data filter's signal without checkpoints.

Feeding in-memory frames to SAM 2 (``frame_feed``): ``init_state`` only accepts a path (a JPEG
folder or an MP4). ``"memory"`` (default) hands it our frames instead: during the ``init_state``
call the loader it resolves (``sam2.sam2_video_predictor.load_video_frames``) is replaced, under a
lock, by one that returns a lazy frame sequence preprocessed exactly as SAM 2's JPEG loader does
(PIL resize to the model's square input, /255, ImageNet mean/std). No disk I/O, no JPEG
re-compression, and only the uint8 frames stay in memory (SAM 2's loader keeps every frame as a
1024² float tensor: ~12 MB a frame). ``"jpeg"`` is the documented path for comparison: frames
written as quality-100 JPEGs to a temporary folder, loaded by ``init_state`` and deleted right
after it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from pmvis.core.errors import PmvisError
from pmvis.models.sources._common import empty_tracks, filled_box_mask, log, resolve_device
from pmvis.models.sources.base import (
    Box,
    SourceConfig,
    SourceMasks,
    SourceSpec,
    VideoInput,
    register_source,
)
from pmvis.models.sources.propagators import FlowPropagator, MaskPropagator, Sam2Propagator

NAME = "track"
DEFAULT_INIT_FROM = "hqsam"


class PropagationConfig(SourceConfig):
    engine: Literal["flow", "sam2", "deaot"] = "sam2"
    init_from: str = Field(DEFAULT_INIT_FROM, description="the source whose masks seed the tracker")
    sam2_config: str = Field("configs/sam2.1/sam2.1_hiera_t.yaml", description="sam2 package config name")
    checkpoint: str | None = Field(None, description="SAM 2 checkpoint (.pt, state dict under 'model'); "
                                                     "null: random weights (tests/demos)")
    sam2_overrides: list[str] = Field(default_factory=list, description="extra hydra overrides of the sam2 "
                                      "model config, e.g. ['++model.image_size=512'] (SAM 2 is trained at 1024)")
    frame_feed: Literal["memory", "jpeg"] = Field("memory", description="how frames reach SAM 2's init_state")
    deaot_root: str | None = Field(None, description="aot-benchmark checkout; null: $PMVIS_DEAOT_ROOT")
    deaot_config: str = Field("r50_deaotl", description="model config under the checkout's configs/models")
    deaot_checkpoint: str | None = Field(None, description="DeAOT weights; null: random weights (tests)")
    deaot_max_long_edge: int = Field(1040, ge=32, description="DeAOT input long edge limit (800 × 1.3)")
    device: str | None = Field(None, description='null: "cuda" if num_gpus > 0 and CUDA is available, else "cpu"')
    random_init_seed: int = Field(0, ge=0, description="torch seed for the random weights when no checkpoint")
    flow_preset: Literal["ultrafast", "fast", "medium"] = Field(
        "medium", description="flow engine: cv2 DIS optical flow preset (DISOPTICAL_FLOW_PRESET_*)")
    flow_fb_tolerance: float = Field(
        1.5, gt=0, description="flow engine: pixels; a mask pixel whose forward-then-backward flow returns "
                               "within this distance is flow-consistent, and a key-mask pixel that lands within "
                               "it of the new mask has survived")
    flow_present_threshold: float = Field(
        0.3, ge=0, le=1, description="flow engine: a propagated mask is reported when its confidence is >= this")
    flow_box_margin: int = Field(
        2, ge=0, description="flow engine: pixels; a propagated mask is cut to its frame's GT box grown by this")
    flow_appearance_bins: int = Field(
        8, ge=2, le=64, description="flow engine: RGB histogram bins per channel of the appearance check")
    flow_search: float = Field(
        3.0, ge=0, description="flow engine: each step also tries the whole mask moved by masked template "
                               "matching within this many object sizes, kept when it beats the flow; 0: off "
                               "(DIS alone loses objects that move more than their own size)")


# ----------------------------------------------------------------------------- key frames


@dataclass
class KeyFrame:
    frame: int
    mask: np.ndarray  # bool (H, W), non-empty
    confidence: float | None  # the init mask's confidence; None for the box fallback
    from_init: bool


def select_key_frame(init: SourceMasks | None, boxes: list[Box | None], height: int, width: int
                     ) -> KeyFrame | None:
    """The instance's best init mask and its frame, else its largest filled box; None if neither."""
    best: tuple[float, int] | None = None
    if init is not None and not (len(init.masks) == len(init.confidences) == len(boxes)):
        raise PmvisError(f"init masks cover {len(init.masks)} frames ({len(init.confidences)} confidences), "
                         f"the video has {len(boxes)}")
    if init is not None:
        for t, (m, c) in enumerate(zip(init.masks, init.confidences)):
            if m is None or not np.any(m):
                continue
            if m.shape != (height, width):
                raise PmvisError(f"frame {t}: init mask shape {m.shape} != frame size {(height, width)}")
            score = -math.inf if c is None or not math.isfinite(c) else float(c)
            if best is None or score > best[0]:
                best = (score, t)
    if best is not None:
        t = best[1]
        c = init.confidences[t]
        return KeyFrame(frame=t, mask=np.asarray(init.masks[t], dtype=bool), from_init=True,
                        confidence=None if c is None else float(c))
    candidates = [(-(b[2] * b[3]), t) for t, b in enumerate(boxes) if b is not None]
    for _, t in sorted(candidates):
        mask = filled_box_mask(boxes[t], height, width)
        if mask.any():
            return KeyFrame(frame=t, mask=mask, confidence=None, from_init=False)
    return None


def group_by_key_frame(keys: dict[int, KeyFrame]) -> list[tuple[int, dict[int, np.ndarray]]]:
    """``[(key_frame, {ann_id: mask})]``, frames ascending; within a group, ascending init confidence
    (an engine that paints one label map, DeAOT, then lets the most confident mask win overlaps)."""
    groups: dict[int, list[tuple[float, int]]] = {}
    for aid, k in keys.items():
        conf = -math.inf if k.confidence is None else k.confidence
        groups.setdefault(k.frame, []).append((conf, aid))
    return [(frame, {aid: keys[aid].mask for _, aid in sorted(members)})
            for frame, members in sorted(groups.items())]


# ----------------------------------------------------------------------------- engines


def build_propagator(config: PropagationConfig) -> MaskPropagator:
    if config.engine == "flow":
        return FlowPropagator(config)
    device = resolve_device(config.device, config.num_gpus)
    if config.engine == "sam2":
        return Sam2Propagator(config, device)
    from pmvis.models.sources.deaot import DeAOTPropagator

    return DeAOTPropagator(config.deaot_root, config.deaot_config, config.deaot_checkpoint, device=device,
                        max_long_edge=config.deaot_max_long_edge, random_init_seed=config.random_init_seed)


# ----------------------------------------------------------------------------- the source


class PropagationSource:
    name = NAME

    def __init__(self, config: PropagationConfig, propagator: MaskPropagator | None = None):
        self.config = config
        self.propagator = propagator if propagator is not None else build_propagator(config)

    def key_frames(self, video: VideoInput) -> dict[int, KeyFrame]:
        H, W = video.size
        keys = {}
        for aid, boxes in video.boxes.items():
            try:
                k = select_key_frame(video.init_masks.get(aid), boxes, H, W)
            except PmvisError as e:
                raise PmvisError(f"video id={video.video_id}, annotation id={aid}: {self.config.init_from} "
                                 f"init masks: {e}") from None
            if k is not None:
                keys[aid] = k
        return keys

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        out = empty_tracks(video)
        keys = self.key_frames(video)
        fallbacks = [aid for aid, k in keys.items() if not k.from_init]
        if fallbacks:
            log.info("video id=%s: no usable %s mask for annotation(s) %s; starting from the largest box",
                     video.video_id, self.config.init_from, fallbacks)
        groups = group_by_key_frame(keys)
        if getattr(self.propagator, "uses_boxes", False):
            tracked = self.propagator.propagate(video.frames, groups, boxes=video.boxes)
        else:
            tracked = self.propagator.propagate(video.frames, groups)
        for aid, (masks, confs) in tracked.items():
            out[aid] = SourceMasks(masks=list(masks), confidences=list(confs))
        return out


register_source(NAME, SourceSpec(config_cls=PropagationConfig, build=PropagationSource, uses_model=True,
                                 needs_init_from=DEFAULT_INIT_FROM))
