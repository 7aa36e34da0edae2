"""Benchmark: the weight-free flow tracker with and without its template-matching move.

On a synthetic YouTube-VIS set (the demo's size by default), GrabCut masks seed the ``track``
source's ``flow`` engine, as in the demo and the method benchmark. Every instance is tracked twice
on the same frames and seeds: ``flow_search=0`` (dense DIS flow only: the baseline) and the
default. For each it prints the time, the share of annotated frames with a mask, the mean IoU with
the true masks over the annotated frames (0 where there is no mask) and over those with one, and
the Missing-Data filter (the demo's settings) against ``defects.json``: precision and recall.

    uv run python benchmarks/track.py                  # 24 videos × 8 frames, seed 0 (~1 min)
    uv run python benchmarks/track.py --seed 1 --videos 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/track"))
    args = p.parse_args(argv)

    from pmvis.core.config import build_config
    from pmvis.core.io import write_json_atomic
    from pmvis.core.masks import encode_mask
    from pmvis.models.sources.base import VideoInput, build_source
    from pmvis.models.sources.propagate import PropagationConfig, PropagationSource
    from pmvis.platform.data.synthetic import generate_synthetic
    from pmvis.platform.data.synthetic_scenes import SynthConfig
    from pmvis.platform.data.ytvis_io import load_dataset_dir, load_ytvis
    from pmvis.platform.demo.config import TRACK_OPTIONS
    from pmvis.platform.demo.run import filter_config
    from pmvis.platform.pseudo.filters import filter_annotations
    from pmvis.platform.pseudo.store import RawMasks

    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)
    generate_synthetic(data, build_config(SynthConfig, {"videos": args.videos, "frames": args.frames,
                                                        "seed": args.seed}, source="benchmark"))
    gt = load_dataset_dir(data)
    truth = {a.id: a for a in load_ytvis(data / "truth.json").annotations}
    defects = {(d["annotation_id"], d["frame"]) for d in json.loads((data / "defects.json").read_text())
               if d["kind"] == "missing"}

    grabcut = build_source("grabcut", {})
    videos: list[VideoInput] = []
    t = time.perf_counter()
    for vid in sorted(gt.videos):
        anns = [a for a in gt.annotations if a.video_id == vid]
        video = VideoInput(video_id=vid, frames=gt.read_video(vid), boxes={a.id: a.bboxes for a in anns},
                           categories={a.id: a.category_id for a in anns})
        video.init_masks = grabcut(video)
        videos.append(video)
    print(f"{len(videos)} videos, {len(gt.annotations)} instances; GrabCut seeds in {time.perf_counter() - t:.1f} s; "
          f"{len(defects)} missing frames injected")

    base = dict(TRACK_OPTIONS)
    rows: dict[str, dict[str, Any]] = {}
    for label, search in (("flow only (flow_search 0)", 0.0), ("flow + template matching (default)", None)):
        cfg = PropagationConfig(**base, **({} if search is None else {"flow_search": search}))
        source = PropagationSource(cfg)
        t = time.perf_counter()
        raw: list[RawMasks] = []
        for video in videos:
            for aid, m in source(video).items():
                raw.append(RawMasks(video_id=video.video_id, annotation_id=aid, source="track",
                                    segmentations=[None if x is None else encode_mask(x) for x in m.masks],
                                    confidences=list(m.confidences)))
        seconds = time.perf_counter() - t
        ious, given = [], []
        by_id = {r.annotation_id: r for r in raw}
        for a in gt.annotations:
            for f, seg in enumerate(a.segmentations):
                true = truth[a.id].segmentations[f]
                if seg is None or true is None:
                    continue
                mask = by_id[a.id].segmentations[f] if a.id in by_id else None
                given.append(mask is not None)
                ious.append(0.0 if mask is None else _iou(mask, true))
        filt = filter_config(base).model_copy(update={"ria": False})
        _, report = filter_annotations(gt, raw, filt)
        found = {(r["annotation_id"], r["frame"]) for r in report if r["kind"] == "missing"}
        tp = len(found & defects)
        iou, given = np.array(ious), np.array(given)
        rows[label] = {"seconds": seconds, "coverage": float(given.mean()), "mean_iou": float(iou.mean()),
                       "iou_where_given": float(iou[given].mean()) if given.any() else None,
                       "md_precision": tp / len(found) if found else None,
                       "md_recall": tp / len(defects) if defects else None, "md_found": len(found)}

    print(f"\n| tracker (seed {args.seed}) | time | annotated frames with a mask | mean IoU | IoU where given "
          "| Missing-Data P / R (found) |\n|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['seconds']:.1f} s | {r['coverage']:.2f} | {r['mean_iou']:.3f} | "
              f"{_fmt(r['iou_where_given'])} | {_fmt(r['md_precision'], 2)} / {_fmt(r['md_recall'], 2)} "
              f"({r['md_found']}) |")
    write_json_atomic(args.out / "track.json", rows, indent=2)
    return 0


def _iou(a: Any, b: Any) -> float:
    from pycocotools import mask as mask_utils

    from pmvis.core.masks import to_coco_rles

    return float(mask_utils.iou(to_coco_rles([a]), to_coco_rles([b]), [0])[0][0])


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
