"""PM-VIS ground-truth filters: RIA (remove inaccurate annotations) and Missing-Data.

Both compare the ground truth with the raw pseudo-mask store (docs/design.md §4.4; thresholds are
knobs of :class:`FilterConfig`) and produce a cleaned dataset for fully supervised training plus
a report. Report entries are ``{video_id, annotation_id, frame, kind, reason, ...}`` with ``kind``
``"inaccurate"`` or ``"missing"``: the same kinds and keys as the ``defects.json`` that `pmvis
synth` writes, so a filter's precision and recall follow from matching
``(video_id, annotation_id, frame, kind)``.

**RIA.** For each GT frame with a mask and a fused pseudo mask (the fusion of ``config.fuse``:
DOOB, SCM, SHQM or vote, prompted by the GT box), IoU(GT mask, fused mask) < ``ria_tau`` drops
the GT mask: its segmentation and area become null, its box is kept (still a valid box label).
IoU equal to τ keeps the mask. Frames without a fused mask are left alone. Entry extras: ``iou``,
``pseudo_source``.

**Missing-Data.** For each frame where the GT entry is null (no box and no mask) but a mask from
one of ``missing_sources`` has confidence ≥ ``missing_min_confidence`` and area ≥
``missing_min_area`` (and > 0) pixels, the instance is probably visible but unlabelled. The most
confident such mask is reported (ties: the source listed first). Entry extras: ``confidence``,
``area``, ``source``, ``action``. Then, by ``missing_action``:

- ``"drop"``: the frame index is added to the annotation's ``extra["excluded_frames"]`` (a sorted
  list, merged with any already there). **Contract:** the training sampler must not use a frame
  listed there as a negative for that instance: it must not sample the frame in a clip that
  supervises the instance as absent (skip the frame for that instance, or ignore the instance's
  absence loss there). The GT entry itself stays null.
- ``"fill"``: the GT entry is filled with that mask (segmentation, its tight box, its area) and
  the frame is added to ``extra["filled_frames"]``.

RIA runs first, then Missing-Data; they look at disjoint frames (with a GT mask / fully null).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Literal, Mapping

from pycocotools import mask as mask_utils
from pydantic import Field, field_validator

from pmvis.core.config import StrictConfig
from pmvis.core.masks import rle_areas, to_coco_rles
from pmvis.models.fusion import FuseConfig, check_source_list
from pmvis.platform.data.ytvis import Annotation, YTVISDataset
from pmvis.platform.pseudo.fuse import fuse_with_stats, index_tracks
from pmvis.platform.pseudo.store import RawMasks

REPORT_KINDS: tuple[str, ...] = ("inaccurate", "missing")


class FilterConfig(StrictConfig):
    """Every knob of the ground-truth filters (see the module docstring for the definitions)."""

    fuse: FuseConfig = Field(default_factory=FuseConfig, description="the pseudo masks RIA compares to")
    ria: bool = True
    ria_tau: float = Field(0.7, ge=0, le=1, description="RIA IoU threshold (authors: 0.7 YTVIS, 0.6 OVIS)")
    missing: bool = True
    missing_sources: list[str] = Field(default_factory=lambda: ["track"])
    missing_min_confidence: float = Field(0.8, ge=0, le=1)
    missing_min_area: int = Field(16, ge=0, description="pixels")
    missing_action: Literal["drop", "fill"] = "drop"

    @field_validator("missing_sources")
    @classmethod
    def _check_missing_sources(cls, v: list[str]) -> list[str]:
        return check_source_list(v, "or set missing: false")


def _copy_annotation(a: Annotation) -> Annotation:
    return Annotation(id=a.id, video_id=a.video_id, category_id=a.category_id,
                      segmentations=list(a.segmentations),
                      bboxes=[None if b is None else list(b) for b in a.bboxes],
                      areas=list(a.areas), iscrowd=a.iscrowd, extra=copy.deepcopy(a.extra))


def filter_annotations(
    gt: YTVISDataset,
    raw_tracks: Iterable[RawMasks] | Mapping[int, Mapping[str, RawMasks]],
    config: FilterConfig,
) -> tuple[YTVISDataset, list[dict[str, Any]]]:
    """Apply RIA and Missing-Data to ``gt``; return the cleaned dataset and the report.

    ``gt`` is not modified. The report is sorted by (video_id, annotation_id, frame, kind); the
    cleaned dataset's ``info["filter"]`` records the config and counts.
    """
    cfg = config
    if not isinstance(raw_tracks, Mapping):
        raw_tracks = index_tracks(gt, raw_tracks, None)[0]
    fused: dict[int, Annotation] = {}
    fuse_stats: dict[str, Any] | None = None
    if cfg.ria:
        fused_ds, fuse_stats = fuse_with_stats(gt, raw_tracks, cfg.fuse)
        fused = {a.id: a for a in fused_ds.annotations}
    by_ann = raw_tracks
    if cfg.missing:
        by_ann, _ = index_tracks(gt, raw_tracks, cfg.missing_sources)

    report: list[dict[str, Any]] = []
    counts = {"ria_checked": 0, "ria_no_fused_mask": 0, "inaccurate": 0, "missing": 0, "null_frames": 0}
    out: list[Annotation] = []
    for src_ann in gt.annotations:
        ann = _copy_annotation(src_ann)
        base = {"video_id": ann.video_id, "annotation_id": ann.id}
        if cfg.ria:
            f = fused[ann.id]
            for t, g in enumerate(ann.segmentations):
                if g is None:
                    continue
                p = f.segmentations[t]
                if p is None:
                    counts["ria_no_fused_mask"] += 1
                    continue
                counts["ria_checked"] += 1
                iou = float(mask_utils.iou(to_coco_rles([p]), to_coco_rles([g]), [0])[0][0])
                if iou < cfg.ria_tau:
                    source = f.extra["frame_source"][t]
                    ann.segmentations[t] = None
                    ann.areas[t] = None
                    report.append({**base, "frame": t, "kind": "inaccurate",
                                   "reason": f"mask IoU {iou:.3f} with the fused pseudo mask ({source}) "
                                             f"is below ria_tau {cfg.ria_tau}",
                                   "iou": iou, "pseudo_source": source})
        if cfg.missing:
            tracks = by_ann.get(ann.id, {})
            srcs = [s for s in cfg.missing_sources if s in tracks]
            excluded: set[int] = set()
            filled: set[int] = set()
            min_area = max(cfg.missing_min_area, 1)
            for t in range(len(ann.segmentations)):
                if ann.segmentations[t] is not None or ann.bboxes[t] is not None:
                    continue
                counts["null_frames"] += 1
                best = None  # (confidence, area, source, rle)
                for s in srcs:
                    rle = tracks[s].segmentations[t]
                    conf = tracks[s].confidences[t]
                    if rle is None or conf is None or not conf >= cfg.missing_min_confidence:
                        continue
                    area = int(rle_areas(to_coco_rles([rle]))[0])
                    if area < min_area:
                        continue
                    if best is None or conf > best[0]:
                        best = (float(conf), area, s, rle)
                if best is None:
                    continue
                conf, area, s, rle = best
                report.append({**base, "frame": t, "kind": "missing",
                               "reason": f"{s} mask with confidence {conf:.3f} and area {area} px "
                                         f"where the annotation is null",
                               "confidence": conf, "area": area, "source": s, "action": cfg.missing_action})
                if cfg.missing_action == "drop":
                    excluded.add(t)
                else:
                    ann.segmentations[t] = {"size": list(rle["size"]), "counts": rle["counts"]}
                    ann.bboxes[t] = [float(v) for v in mask_utils.toBbox(to_coco_rles([rle])[0])]
                    ann.areas[t] = area
                    filled.add(t)
            if excluded:
                ann.extra["excluded_frames"] = sorted(excluded | set(ann.extra.get("excluded_frames") or []))
            if filled:
                ann.extra["filled_frames"] = sorted(filled | set(ann.extra.get("filled_frames") or []))
        out.append(ann)
    report.sort(key=lambda r: (r["video_id"], r["annotation_id"], r["frame"], r["kind"]))
    for kind in REPORT_KINDS:
        counts[kind] = sum(r["kind"] == kind for r in report)
    info = {**gt.info, "filter": {"config": cfg.model_dump(mode="json"), "counts": counts,
                                  "fusion_stats": fuse_stats}}
    clean = YTVISDataset(videos=gt.videos, annotations=out, categories=dict(gt.categories), path=None,
                         frames_root=gt.frames_root, info=info)
    return clean, report
