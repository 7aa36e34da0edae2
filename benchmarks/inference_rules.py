"""Benchmark: IDOL's inference rules against pmvis's first ones, on stored checkpoints.

Scores the held-out videos of finished runs (a `pmvis demo` or `benchmarks/method.py` output
directory: DIR/data with truth.json, DIR/runs/RUN/checkpoint_*/) with several InferenceConfig
variants and prints held-out AP per run and variant — no training, so the rules are compared on
exactly the same models:

* ``idol``: InferenceConfig's defaults (IDOL's rules);
* ``idol, <knob>=<old>``: one rule back to pmvis's first choice;
* ``first rules``: all of them back (class-agnostic NMS, no top-1 fallback, score × recency,
  global mutual-best association without frame weighting, one result per track, no short-track
  rule, a track kept for 11 missed frames).

    uv run python benchmarks/inference_rules.py pmvis-demo                      # box_only, pmvis, full
    uv run python benchmarks/inference_rules.py benchmarks/out/method --runs box_only pmvis pmvis_tk full
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST_RULES = {"class_aware_nms": False, "top1_fallback": False, "temporal_weighting": "multiply",
               "association": "mutual_best", "frame_weighting": False, "multi_class": False,
               "short_track_min_frames": 0, "max_missed": 11}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="a demo or method-benchmark output directory")
    p.add_argument("--runs", nargs="+", default=["box_only", "pmvis", "full"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single", action="store_true", help="also each rule back on its own (slower)")
    args = p.parse_args(argv)

    import torch

    from pmvis.core.tables import format_table
    from pmvis.models.vis.checkpoint import load_model
    from pmvis.models.vis.inference import InferenceConfig
    from pmvis.platform.data.ytvis_io import load_dataset_dir, load_ytvis
    from pmvis.platform.evaluation import evaluate_ytvis
    from pmvis.platform.predict import predict_dataset

    torch.set_num_threads(args.threads)
    data = load_dataset_dir(args.dir / "data")
    truth = load_ytvis(args.dir / "data" / "truth.json")
    variants: dict[str, dict] = {"idol": {}, "idol, association=mutual_best": {"association": "mutual_best"}}
    if args.single:
        variants.update({f"idol, {k}={v}": {k: v} for k, v in FIRST_RULES.items() if k != "association"})
    variants["first rules"] = FIRST_RULES
    rows = []
    for run in args.runs:
        found = sorted(glob.glob(str(args.dir / "runs" / run / "checkpoint_*" / "checkpoint.pt")))
        if not found:
            p.error(f"no checkpoint under {args.dir / 'runs' / run}")
        model, _, state = load_model(found[-1])
        val, ids = state["extra"]["val_videos"], state["extra"]["category_ids"]
        gt = truth.subset(val)
        for name, over in variants.items():
            cfg = InferenceConfig(test_short_side=None, test_max_size=None, **over)
            print(f"{run}: {name} ...", file=sys.stderr, flush=True)  # ~10 s a variant on the demo's 8 videos
            results = predict_dataset(model, data, cfg, category_ids=ids, video_ids=val, progress=True)
            m = evaluate_ytvis(gt, results).metrics
            rows.append([run, name, f"{m['AP']:.1f}", f"{m['AP50']:.1f}", f"{m['AR10']:.1f}", str(len(results))])
    print(format_table(["run", "inference", "AP", "AP50", "AR10", "results"], rows, style="markdown"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
