"""YouTube-VIS evaluation with the official ``ytvoseval`` semantics, computed with compiled run walks.

Semantics (youtubevos/cocoapi ``ytvoseval.py``), reproduced exactly:

* spatio-temporal IoU = Σ_t |D∩G| / Σ_t |D∪G|; a frame where only one side has a mask adds that
  mask's area to the union; 0 when the union is empty;
* matching per video and category, detections sorted by score (stable), at most 100 per
  video/category, greedy COCO matching per IoU threshold (.50:.05:.95), crowd ground truth is
  ignored and may absorb several detections (crowd IoU is the plain IoU in ytvoseval);
* area ranges on the average of an instance's non-null, non-zero per-frame areas (ground truth:
  the file's ``areas``; detections: computed from the masks): all, small < 128², medium, large
  > 256²; unmatched detections outside the range are ignored;
* accumulation with 101 recall points and maxDets 1/10/100; -1 where a stat is undefined.

Where the official code loops over every detection/ground-truth pair and frame merging RLEs
(pycocotools parses both masks on every merge), here each video's masks are parsed once
(``pmvis.kernels.rle``) and only pairs that matching can use are computed (same category,
detection among the top ``MAX_DETS[-1]``); of those, only pairs whose IoU upper bound from
per-frame areas reaches ``PRUNE_BELOW`` (the lowest IoU threshold): below it no metric can tell
the IoU from 0. A computed pair costs one walk over the two run lists per frame where both have
a mask. ``mask_quality`` needs every IoU, so it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pmvis.core.tables import format_table
from pmvis.platform.data.ytvis import Annotation, Result, YTVISDataset
from pmvis.platform.spatiotemporal_iou import (
    RleTracks,
    iou_upper_bound,
    spatio_temporal_iou_pairs,
    track_pair_intersections,
)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 128.0**2),
    "medium": (128.0**2, 256.0**2),
    "large": (256.0**2, 1e5**2),
}
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")


# ----------------------------------------------------------------------------- spatio-temporal IoU

# An IoU below every matching threshold never changes a match (``_match`` starts at the lowest
# threshold), so ``evaluate_ytvis`` may report such a pair as 0 without computing it.
PRUNE_BELOW = float(IOU_THRESHOLDS.min())


def _average_area(areas: Sequence[float | None]) -> float:
    """ytvoseval's ``avg_area``: mean over frames with a truthy area (None and 0 are skipped)."""
    present = [a for a in areas if a]
    return float(np.mean(present)) if present else 0.0


# ----------------------------------------------------------------------------- matching


@dataclass
class _VideoCategoryEval:
    dt_scores: np.ndarray  # (D,)
    dt_matched: np.ndarray  # (A, T, D) bool
    dt_ignore: np.ndarray  # (A, T, D) bool
    gt_ignore: np.ndarray  # (A, G) bool


def _match(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO greedy matching of score-sorted detections to ground truth sorted non-ignored first."""
    n_thr = len(IOU_THRESHOLDS)
    nd, ng = ious.shape
    gt_taken = np.zeros((n_thr, ng), dtype=bool)
    dt_matched = np.zeros((n_thr, nd), dtype=bool)
    dt_ignore = np.zeros((n_thr, nd), dtype=bool)
    if ng == 0 or nd == 0:
        return dt_matched, dt_ignore
    top = ious.max()
    for ti, thr in enumerate(IOU_THRESHOLDS):
        if top < min(thr, 1 - 1e-10):  # no pair reaches this or any higher threshold
            break
        for di in range(nd):
            best_iou = min(thr, 1 - 1e-10)
            m = -1
            for gi in range(ng):
                if gt_taken[ti, gi] and not gt_crowd[gi]:
                    continue
                if m > -1 and not gt_ignore[m] and gt_ignore[gi]:
                    break
                if ious[di, gi] < best_iou:
                    continue
                best_iou = ious[di, gi]
                m = gi
            if m == -1:
                continue
            dt_ignore[ti, di] = gt_ignore[m]
            dt_matched[ti, di] = True
            gt_taken[ti, m] = True
    return dt_matched, dt_ignore


def _evaluate_video_category(
    ious: np.ndarray, dt_scores: np.ndarray, dt_avg_area: np.ndarray, gt_avg_area: np.ndarray,
    gt_crowd: np.ndarray,
) -> _VideoCategoryEval:
    """Match once per area range (rows of ious: detections sorted by score, cut to maxDets[-1])."""
    n_area, n_thr = len(AREA_RANGES), len(IOU_THRESHOLDS)
    nd, ng = ious.shape
    out = _VideoCategoryEval(
        dt_scores=dt_scores,
        dt_matched=np.zeros((n_area, n_thr, nd), dtype=bool),
        dt_ignore=np.zeros((n_area, n_thr, nd), dtype=bool),
        gt_ignore=np.zeros((n_area, ng), dtype=bool),
    )
    for ai, (lo, hi) in enumerate(AREA_RANGES.values()):
        gt_ig = gt_crowd | (gt_avg_area < lo) | (gt_avg_area > hi)
        order = np.argsort(gt_ig, kind="mergesort")
        matched, ignored = _match(ious[:, order], gt_ig[order], gt_crowd[order])
        out_of_range = (dt_avg_area < lo) | (dt_avg_area > hi)
        out.dt_matched[ai] = matched
        out.dt_ignore[ai] = ignored | (~matched & out_of_range[None, :])
        out.gt_ignore[ai] = gt_ig
    return out


# ----------------------------------------------------------------------------- accumulate


def _accumulate(evals: dict[int, list[_VideoCategoryEval]], cat_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """COCO accumulation → precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined."""
    n_thr, n_rec, n_cat = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(cat_ids)
    n_area, n_md = len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_thr, n_rec, n_cat, n_area, n_md))
    recall = -np.ones((n_thr, n_cat, n_area, n_md))
    for k, cid in enumerate(cat_ids):
        E = evals.get(cid, [])
        if not E:
            continue
        for a in range(n_area):
            gt_ig = np.concatenate([e.gt_ignore[a] for e in E])
            n_pos = int(np.count_nonzero(~gt_ig))
            if n_pos == 0:
                continue
            for m, max_det in enumerate(MAX_DETS):
                scores = np.concatenate([e.dt_scores[:max_det] for e in E])
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([e.dt_matched[a][:, :max_det] for e in E], axis=1)[:, order]
                ignored = np.concatenate([e.dt_ignore[a][:, :max_det] for e in E], axis=1)[:, order]
                tps = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)
                fps = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)
                nd = tps.shape[1]
                for t in range(n_thr):
                    tp, fp = tps[t], fps[t]
                    rc = tp / n_pos
                    pr = tp / (fp + tp + np.spacing(1))
                    recall[t, k, a, m] = rc[-1] if nd else 0.0
                    # precision envelope: make it non-increasing from the right
                    pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr
                    idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                    q = np.zeros(n_rec)
                    valid = idx < nd
                    q[valid] = pr[idx[valid]]
                    precision[t, :, k, a, m] = q
    return precision, recall


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0


# ----------------------------------------------------------------------------- public API


@dataclass
class EvalResult:
    """Official stats ×100 (None where the official evaluator gives −1) and per-category AP."""

    metrics: dict[str, float | None]
    per_category: dict[str, float | None]
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)

    def to_json(self) -> dict:
        return {**self.metrics, "per_category_AP": self.per_category}


def _percent(value: float) -> float | None:
    return None if value == -1 else 100.0 * value


def _pair_ious(d: RleTracks, g: RleTracks, pairs: np.ndarray, *, prune: bool) -> np.ndarray:
    """IoU of each (detection, ground truth) pair; with ``prune``, pairs whose upper bound is
    below ``PRUNE_BELOW`` are 0 without walking their masks (no metric can tell)."""
    ious = np.zeros(len(pairs))
    exact = iou_upper_bound(d, g, pairs) >= PRUNE_BELOW if prune else np.ones(len(pairs), dtype=bool)
    if exact.any():
        p = pairs[exact]
        ious[exact] = spatio_temporal_iou_pairs(
            track_pair_intersections(d, g, p), d.areas.sum(1)[p[:, 0]], g.areas.sum(1)[p[:, 1]])
    return ious


def evaluate_ytvis(gt: YTVISDataset, results: Sequence[Result], *, prune: bool = True) -> EvalResult:
    """AP/AR of ``results`` against ``gt`` with the official ytvoseval semantics (see module doc).

    Only the pairs matching can use are computed: same category, detection among its video and
    category's top ``MAX_DETS[-1]``. ``prune=False`` also walks the pairs that can never match
    (the reference the pruned path must equal).
    """
    cat_ids = sorted(gt.categories)
    gt_by_video = gt.annotations_by_video()
    dt_by_video: dict[int, list[Result]] = {vid: [] for vid in gt.videos}
    for r in results:
        dt_by_video[r.video_id].append(r)

    evals: dict[int, list[_VideoCategoryEval]] = {cid: [] for cid in cat_ids}
    for vid in sorted(gt.videos):
        gts: list[Annotation] = gt_by_video[vid]
        dts = dt_by_video[vid]
        if not gts and not dts:
            continue
        length = gt.videos[vid].length
        d, g = RleTracks.build_many([[r.segmentations for r in dts], [a.segmentations for a in gts]], length,
                                  where=f"video id={vid}")
        dt_avg = np.array([_average_area(row) for row in d.areas])
        gt_avg = np.array([_average_area(a.areas) for a in gts])
        d_by_cat: dict[int, list[int]] = {}
        g_by_cat: dict[int, list[int]] = {}
        for i, r in enumerate(dts):
            d_by_cat.setdefault(r.category_id, []).append(i)
        for j, a in enumerate(gts):
            g_by_cat.setdefault(a.category_id, []).append(j)
        selected: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for cid in sorted(d_by_cat.keys() | g_by_cat.keys()):
            d_idx, g_idx = d_by_cat.get(cid, []), g_by_cat.get(cid, [])
            scores = np.array([dts[i].score for i in d_idx], dtype=np.float64)
            order = np.argsort(-scores, kind="mergesort")[: MAX_DETS[-1]]
            selected.append((cid, np.array(d_idx, dtype=int)[order], np.array(g_idx, dtype=int), scores[order]))
        pairs = np.array([(i, j) for _, d_sel, g_sel, _ in selected for i in d_sel for j in g_sel],
                         dtype=int).reshape(-1, 2)
        ious_all = np.zeros((len(dts), len(gts)))
        ious_all[pairs[:, 0], pairs[:, 1]] = _pair_ious(d, g, pairs, prune=prune)
        for cid, d_sel, g_sel, scores in selected:
            evals[cid].append(_evaluate_video_category(
                ious_all[np.ix_(d_sel, g_sel)],
                scores,
                dt_avg[d_sel],
                gt_avg[g_sel],
                np.array([gts[j].iscrowd == 1 for j in g_sel], dtype=bool),
            ))

    precision, recall = _accumulate(evals, cat_ids)
    all_a, last_m = 0, len(MAX_DETS) - 1
    stats = {
        "AP": _mean_defined(precision[:, :, :, all_a, last_m]),
        "AP50": _mean_defined(precision[0, :, :, all_a, last_m]),
        "AP75": _mean_defined(precision[5, :, :, all_a, last_m]),
        "APs": _mean_defined(precision[:, :, :, 1, last_m]),
        "APm": _mean_defined(precision[:, :, :, 2, last_m]),
        "APl": _mean_defined(precision[:, :, :, 3, last_m]),
        "AR1": _mean_defined(recall[:, :, all_a, 0]),
        "AR10": _mean_defined(recall[:, :, all_a, 1]),
    }
    per_category = {
        gt.categories[cid]: _percent(_mean_defined(precision[:, :, k, all_a, last_m]))
        for k, cid in enumerate(cat_ids)
    }
    return EvalResult(
        metrics={name: _percent(v) for name, v in stats.items()},
        per_category=per_category,
        precision=precision,
        recall=recall,
    )


def format_metrics_table(result: EvalResult, *, title: str | None = None) -> str:
    """The AP/AR row plus per-category AP, as plain text for a terminal or a log."""
    def fmt(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.2f}"

    lines = [title] if title else []
    lines.append(format_table(METRIC_NAMES, [[fmt(result.metrics[n]) for n in METRIC_NAMES]],
                              align="r" * len(METRIC_NAMES)))
    if result.per_category:
        lines.append("per-category AP: " + ", ".join(f"{k} {fmt(v).strip()}" for k, v in result.per_category.items()))
    return "\n".join(lines)


