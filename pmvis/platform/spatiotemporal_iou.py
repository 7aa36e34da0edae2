"""Spatio-temporal IoU of mask tracks, as YouTube-VIS defines it (docs/design.md §3):
Σ_t |D_t ∩ G_t| / Σ_t |D_t ∪ G_t| over a video's frames, computed on compressed RLE runs without
decoding a mask, and the mean IoU of annotation files against a reference (mask quality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pmvis.core.errors import PmvisError
from pmvis.core.masks import Rle
from pmvis.platform.data.ytvis import Annotation, YTVISDataset


@dataclass
class RleTracks:
    """A video's tracks as indices into masks parsed once per video, with per-frame areas."""

    runs: np.ndarray  # the video's parsed runs (``pmvis.kernels.rle.parse_counts``), shared
    offsets: np.ndarray
    masks: np.ndarray  # (n, T) int64: each frame's mask index into ``offsets``, -1 where absent
    areas: np.ndarray  # (n, T) float64, 0 where absent

    @classmethod
    def build_many(cls, track_sets: Sequence[Sequence[Sequence[Rle | None]]], length: int,
                   where: str = "one video") -> list["RleTracks"]:
        """Parse every mask of ``track_sets`` (one video's, one frame size) once, in one call;
        ``where`` names the video in the error when the masks do not share one frame size."""

        counts: list[str] = []
        sizes: set[tuple[int, int]] = set()
        indices = []
        for tracks in track_sets:
            idx = np.full((len(tracks), length), -1, dtype=np.int64)
            for i, track in enumerate(tracks):
                for t, r in enumerate(track):
                    if r is None:
                        continue
                    c = r["counts"]
                    idx[i, t] = len(counts)
                    counts.append(c.decode("ascii") if isinstance(c, bytes) else c)
                    sizes.add((int(r["size"][0]), int(r["size"][1])))
            indices.append(idx)
        from pmvis.kernels.rle import parse_counts  # numba: imported (and compiled) where masks are compared

        runs, offsets, areas, totals = parse_counts(counts)
        if len(sizes) > 1 or (sizes and np.any(totals != np.prod(next(iter(sizes))))):
            raise PmvisError(f"masks of {where} differ in size or do not cover it: sizes {sorted(sizes)}, "
                             f"run totals {sorted(set(totals.tolist()))[:5]}")
        out = []
        for idx in indices:
            track_areas = np.where(idx >= 0, areas[np.maximum(idx, 0)] if len(areas) else 0, 0).astype(np.float64)
            out.append(cls(runs, offsets, idx, track_areas))
        return out

    @property
    def length(self) -> int:
        return self.masks.shape[1]


def iou_upper_bound(d: RleTracks, g: RleTracks, pairs: np.ndarray) -> np.ndarray:
    """An upper bound on each pair's spatio-temporal IoU from per-frame areas alone.

    Per frame |D∩G| ≤ min(|D|, |G|), and IoU = I / (ΣD + ΣG − I) grows with I, so putting the
    bound in for I bounds the IoU. Bound and IoU are each one correctly rounded division of
    exact integers, so the float bound is never below the float IoU.
    """
    di, gj = pairs[:, 0], pairs[:, 1]
    inter = np.minimum(d.areas[di], g.areas[gj]).sum(1)
    return spatio_temporal_iou_pairs(inter, d.areas.sum(1)[di], g.areas.sum(1)[gj])


def track_pair_intersections(d: RleTracks, g: RleTracks, pairs: np.ndarray) -> np.ndarray:
    """Exact Σ_t |D∩G| of the (detection, ground truth) index ``pairs`` (one run walk per pair-frame
    where both have a mask; ``d`` and ``g`` from one ``RleTracks.build_many``)."""

    if d.runs is not g.runs:
        raise ValueError("detections and ground truth must come from one RleTracks.build_many call")
    from pmvis.kernels.rle import pair_intersections  # numba, as in RleTracks.build_many

    return pair_intersections(d.runs, d.offsets, d.masks, g.masks, pairs).astype(np.float64)


def track_intersections(
    dt_tracks: Sequence[Sequence[Rle | None]], gt_tracks: Sequence[Sequence[Rle | None]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σ_t |D∩G| for every (detection, ground truth) pair, and each track's Σ_t area.

    Returns ``(inter (nd, ng), dt_area (nd,), gt_area (ng,))`` as float64 holding exact integers.
    """
    nd, ng = len(dt_tracks), len(gt_tracks)
    length = len(dt_tracks[0]) if nd else (len(gt_tracks[0]) if ng else 0)
    d, g = RleTracks.build_many([dt_tracks, gt_tracks], length)
    pairs = np.stack(np.meshgrid(np.arange(nd), np.arange(ng), indexing="ij"), -1).reshape(-1, 2)
    inter = track_pair_intersections(d, g, pairs).reshape(nd, ng)
    return inter, d.areas.sum(1), g.areas.sum(1)


def spatio_temporal_iou_pairs(inter: np.ndarray, dt_area: np.ndarray, gt_area: np.ndarray) -> np.ndarray:
    """Elementwise I / (A + B − I), 0 where the union is empty (arrays of one shape)."""
    union = dt_area + gt_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def spatio_temporal_iou(inter: np.ndarray, dt_area: np.ndarray, gt_area: np.ndarray) -> np.ndarray:
    """The (nd, ng) IoU matrix from ``track_intersections``' output."""
    return spatio_temporal_iou_pairs(inter, dt_area[:, None], gt_area[None, :])


@dataclass
class MaskQuality:
    """Spatio-temporal IoU of each annotation against the same id in the reference set."""

    per_annotation: dict[int, float | None]
    mean: float | None

    def share_above(self, threshold: float) -> float | None:
        vals = [v for v in self.per_annotation.values() if v is not None]
        return float(np.mean([v > threshold for v in vals])) if vals else None


def mask_quality(predicted: Sequence[Annotation], reference: YTVISDataset) -> MaskQuality:
    """Per-annotation spatio-temporal IoU of ``predicted`` masks against ``reference`` (same ids).

    An annotation whose masks are empty on both sides in every frame has no IoU (None) and is
    left out of the mean. Predicted ids missing from the reference are an error.
    """
    ref_by_id = {a.id: a for a in reference.annotations}
    missing = [a.id for a in predicted if a.id not in ref_by_id]
    if missing:
        raise PmvisError(f"annotation ids {missing[:10]} are not in the reference {reference.path or ''}")
    by_video: dict[int, list[Annotation]] = {}
    for a in predicted:
        by_video.setdefault(a.video_id, []).append(a)
    per_annotation: dict[int, float | None] = {}
    for anns in by_video.values():
        refs = [ref_by_id[a.id] for a in anns]
        for a, r in zip(anns, refs):
            if len(a.segmentations) != len(r.segmentations):
                raise PmvisError(f"annotation id={a.id}: {len(a.segmentations)} frames vs "
                                 f"{len(r.segmentations)} in the reference")
        length = len(anns[0].segmentations)
        pred_tracks, ref_tracks = RleTracks.build_many(
            [[a.segmentations for a in anns], [r.segmentations for r in refs]], length,
            where=f"video id={anns[0].video_id}")
        same_id = np.repeat(np.arange(len(anns)), 2).reshape(-1, 2)  # exact: low IoUs count here
        inter = track_pair_intersections(pred_tracks, ref_tracks, same_id)
        union = pred_tracks.areas.sum(1) + ref_tracks.areas.sum(1) - inter
        for a, ii, uu in zip(anns, inter, union):
            per_annotation[a.id] = float(ii / uu) if uu > 0 else None
    values = [v for v in per_annotation.values() if v is not None]
    return MaskQuality(per_annotation=per_annotation, mean=float(np.mean(values)) if values else None)
