"""Benchmark: `pmvis evaluate`'s evaluator vs a straightforward per-pair, per-frame one.

The baseline below is written from the definition (docs/design.md §3) the way the official
``ytvoseval`` does it: for every (video, category), every detection × ground-truth pair and every
frame, merge the two RLEs to get intersection and union; then COCO matching and accumulation in
plain loops. ``pmvis`` is ``evaluate_ytvis`` as `pmvis evaluate` runs it (pairs that can never
match skipped), ``pmvis exact`` the same with every same-category pair computed. All three run on
the same synthetic set the size of YouTube-VIS 2019 val (302 videos, 36 frames, ~1.8 instances
and 10 detections per video, 720×1280) and must give identical metrics; the ratios of their
times are printed.

    uv run python benchmarks/evaluate.py            # full size (mask generation takes 1-3 min)
    uv run python benchmarks/evaluate.py --videos 20 --size 360 640   # quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmvis.core.masks import encode_mask  # noqa: E402
from pmvis.platform.data.results_io import parse_results
from pmvis.platform.data.ytvis_io import parse_ytvis
from pmvis.platform.evaluation import (
    AREA_RANGES,
    IOU_THRESHOLDS,
    MAX_DETS,
    METRIC_NAMES,
    RECALL_THRESHOLDS,
    evaluate_ytvis,
)

N_CATEGORIES = 40


# ----------------------------------------------------------------------------- synthetic set


def _ellipse(h: int, w: int, cx: float, cy: float, ax: float, ay: float) -> dict | None:
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (int(cx), int(cy)), (max(int(ax), 1), max(int(ay), 1)), 0, 0, 360, 1, -1)
    return encode_mask(mask) if mask.any() else None


def _track(rng, h, w, frames, jitter=0.0, base=None):
    """An ellipse moving linearly; absent in a random prefix/suffix. ``base`` perturbs a given track."""
    if base is None:
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        ax, ay = rng.uniform(0.03, 0.25) * w, rng.uniform(0.03, 0.25) * h
        vx, vy = rng.normal(0, 4, 2)
        start = int(rng.integers(0, frames // 4 + 1))
        stop = frames - int(rng.integers(0, frames // 4 + 1))
        base = (cx, cy, ax, ay, vx, vy, start, stop)
    cx, cy, ax, ay, vx, vy, start, stop = base
    dx, dy = rng.normal(0, jitter * ax, 2) if jitter else (0, 0)
    s = 1 + (rng.normal(0, jitter) if jitter else 0)
    segs = [None] * frames
    for t in range(start, stop):
        segs[t] = _ellipse(h, w, cx + vx * t + dx, cy + vy * t + dy, ax * s, ay * s)
    return base, segs


def make_dataset(videos: int, frames: int, h: int, w: int, dets_per_video: int, seed: int):
    rng = np.random.default_rng(seed)
    gt = {"videos": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in range(1, N_CATEGORIES + 1)]}
    results = []
    for vid in range(1, videos + 1):
        gt["videos"].append({"id": vid, "width": w, "height": h, "length": frames,
                             "file_names": [f"{vid}/{t:05d}.jpg" for t in range(frames)]})
        n_inst = int(rng.choice([1, 1, 2, 2, 3]))  # mean ~1.8 instances per video
        tracks = []
        for _ in range(n_inst):
            base, segs = _track(rng, h, w, frames)
            if all(s is None for s in segs):
                continue
            cat = int(rng.integers(1, N_CATEGORIES + 1))
            tracks.append((base, cat))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "video_id": vid, "category_id": cat,
                                      "iscrowd": 0, "segmentations": segs})
        video_cats = [c for _, c in tracks]
        for _ in range(dets_per_video):
            # A VIS model's top-10 per video: mostly the video's instances, mostly labelled with
            # classes present in the video (the same track is often repeated with another class).
            if tracks and rng.random() < 0.7:
                base, _ = tracks[int(rng.integers(len(tracks)))]
                _, segs = _track(rng, h, w, frames, jitter=0.15, base=base)
            else:
                _, segs = _track(rng, h, w, frames)
            if video_cats and rng.random() < 0.8:
                cat = int(rng.choice(video_cats))
            else:
                cat = int(rng.integers(1, N_CATEGORIES + 1))
            results.append({"video_id": vid, "category_id": cat, "score": float(rng.random()),
                            "segmentations": segs})
    return gt, results


# ----------------------------------------------------------------------------- the baseline


def _coco(rle):
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def naive_track_iou(d_seq, g_seq) -> float:
    """Spatio-temporal IoU of one pair, frame by frame, by merging RLEs."""
    inter = union = 0.0
    for d, g in zip(d_seq, g_seq):
        if d is not None and g is not None:
            inter += mask_utils.area(mask_utils.merge([_coco(d), _coco(g)], intersect=True))
            union += mask_utils.area(mask_utils.merge([_coco(d), _coco(g)], intersect=False))
        elif d is not None:
            union += mask_utils.area(_coco(d))
        elif g is not None:
            union += mask_utils.area(_coco(g))
    return inter / union if union > 0 else 0.0


def _avg_area(areas):
    present = [a for a in areas if a]
    return float(np.mean(present)) if present else 0.0


def naive_evaluate(gt, results) -> dict[str, float | None]:
    cat_ids = sorted(gt.categories)
    n_t, n_r, n_k, n_a, n_m = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(cat_ids), len(AREA_RANGES), len(MAX_DETS)
    evals = {}
    gt_by_video = {vid: [a for a in gt.annotations if a.video_id == vid] for vid in gt.videos}
    dt_by_video = {vid: [r for r in results if r.video_id == vid] for vid in gt.videos}
    for vid in sorted(gt.videos):
        for cid in cat_ids:
            gts = [a for a in gt_by_video[vid] if a.category_id == cid]
            dts = [r for r in dt_by_video[vid] if r.category_id == cid]
            if not gts and not dts:
                continue
            order = np.argsort([-d.score for d in dts], kind="mergesort")[: MAX_DETS[-1]]
            dts = [dts[i] for i in order]
            ious = np.array([[naive_track_iou(d.segmentations, g.segmentations) for g in gts] for d in dts])
            d_areas = [_avg_area([mask_utils.area(_coco(s)) if s else None for s in d.segmentations]) for d in dts]
            for ai, (lo, hi) in enumerate(AREA_RANGES.values()):
                g_ig = [bool(g.iscrowd) or not (lo <= _avg_area(g.areas) <= hi) for g in gts]
                g_order = np.argsort(g_ig, kind="mergesort")
                g_ig_sorted = [g_ig[j] for j in g_order]
                crowd = [bool(gts[j].iscrowd) for j in g_order]
                matched = np.zeros((n_t, len(dts)), bool)
                ignored = np.zeros((n_t, len(dts)), bool)
                for ti, thr in enumerate(IOU_THRESHOLDS):
                    taken = [False] * len(gts)
                    for di in range(len(dts)):
                        best, m = min(thr, 1 - 1e-10), -1
                        for k, gj in enumerate(g_order):
                            if taken[k] and not crowd[k]:
                                continue
                            if m > -1 and not g_ig_sorted[m] and g_ig_sorted[k]:
                                break
                            if ious[di, gj] < best:
                                continue
                            best, m = ious[di, gj], k
                        if m > -1:
                            matched[ti, di], ignored[ti, di], taken[m] = True, g_ig_sorted[m], True
                    for di in range(len(dts)):
                        if not matched[ti, di] and not (lo <= d_areas[di] <= hi):
                            ignored[ti, di] = True
                evals[(cid, ai, vid)] = ([d.score for d in dts], matched, ignored, g_ig)
    precision = -np.ones((n_t, n_r, n_k, n_a, n_m))
    recall = -np.ones((n_t, n_k, n_a, n_m))
    for k, cid in enumerate(cat_ids):
        for ai in range(n_a):
            E = [e for (c, a, _), e in evals.items() if c == cid and a == ai]
            n_pos = sum(not ig for e in E for ig in e[3])
            if n_pos == 0:
                continue
            for mi, md in enumerate(MAX_DETS):
                scores = np.concatenate([np.asarray(e[0][:md], float) for e in E]) if E else np.zeros(0)
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([e[1][:, :md] for e in E], axis=1)[:, order]
                ignored = np.concatenate([e[2][:, :md] for e in E], axis=1)[:, order]
                for ti in range(n_t):
                    tp = fp = 0
                    rc, pr = [], []
                    for j in range(matched.shape[1]):
                        if ignored[ti, j]:
                            pass
                        elif matched[ti, j]:
                            tp += 1
                        else:
                            fp += 1
                        rc.append(tp / n_pos)
                        pr.append(tp / (tp + fp + np.spacing(1)))
                    recall[ti, k, ai, mi] = rc[-1] if rc else 0.0
                    for j in range(len(pr) - 1, 0, -1):
                        pr[j - 1] = max(pr[j - 1], pr[j])
                    idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                    precision[ti, :, k, ai, mi] = [pr[i] if i < len(pr) else 0.0 for i in idx]

    def mean(x):
        x = x[x > -1]
        return None if x.size == 0 else 100 * float(x.mean())

    return {"AP": mean(precision[:, :, :, 0, 2]), "AP50": mean(precision[0, :, :, 0, 2]),
            "AP75": mean(precision[5, :, :, 0, 2]), "APs": mean(precision[:, :, :, 1, 2]),
            "APm": mean(precision[:, :, :, 2, 2]), "APl": mean(precision[:, :, :, 3, 2]),
            "AR1": mean(recall[:, :, 0, 0]), "AR10": mean(recall[:, :, 0, 1])}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=302)
    p.add_argument("--frames", type=int, default=36)
    p.add_argument("--size", type=int, nargs=2, default=(720, 1280), metavar=("H", "W"))
    p.add_argument("--dets", type=int, default=10, help="detections per video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each evaluator, interleaved (best kept)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    gt_raw, res_raw = make_dataset(args.videos, args.frames, *args.size, args.dets, args.seed)
    gt = parse_ytvis(gt_raw)
    results = parse_results(res_raw, gt)
    n_inst = len(gt.annotations)
    print(f"set: {args.videos} videos x {args.frames} frames at {args.size[0]}x{args.size[1]}, "
          f"{n_inst} instances ({n_inst / args.videos:.2f}/video), {len(results)} detections "
          f"(built in {time.perf_counter() - t0:.1f} s)")

    runs = {
        "pmvis": lambda: evaluate_ytvis(gt, results).metrics,
        "pmvis exact": lambda: evaluate_ytvis(gt, results, prune=False).metrics,
        "baseline": lambda: naive_evaluate(gt, results),
    }
    # Interleaved repeats, best kept; CPU time of this (single-threaded) process as well as wall
    # time, since the machines here are shared and a busy neighbour inflates wall time.
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    metrics = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            c, w = time.process_time(), time.perf_counter()
            metrics[name] = run()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)

    def same(a: dict, b: dict) -> bool:
        return all((a[k] is None and b[k] is None) or (a[k] is not None and b[k] is not None and abs(a[k] - b[k]) < 1e-9)
                   for k in METRIC_NAMES)

    identical = all(same(metrics[name], metrics["baseline"]) for name in runs)
    print("metric        " + "  ".join(f"{k:>7}" for k in METRIC_NAMES))
    for name, m in metrics.items():
        print(f"{name:13} " + "  ".join("      -" if m[k] is None else f"{m[k]:7.3f}" for k in METRIC_NAMES))
    print(f"identical metrics (pmvis, pmvis exact, baseline): {identical}")
    base_cpu, base_wall = min(cpu["baseline"]), min(wall["baseline"])
    for name in runs:
        print(f"time {name:13} CPU {min(cpu[name]):6.2f} s  wall {min(wall[name]):6.2f} s (best of {args.repeats})"
              + ("" if name == "baseline" else
                 f"  speed-up vs baseline: {base_cpu / min(cpu[name]):.2f}x CPU, {base_wall / min(wall[name]):.2f}x wall"))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
