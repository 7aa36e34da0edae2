"""Run a trained VIS checkpoint on a dataset's videos and write YouTube-VIS results.

Online inference as IDOL's (docs/design.md §4.3): chunks of 10 frames through the model, score >
0.1 (else the best query), class-aware box NMS 0.9 then mask NMS 0.5, memory-bank tracking
(bi-softmax association > 0.5 with IDOL's temporal and frame weighting, new track above 0.2, drop
after 10 missed frames, short tracks dropped). One result per track and class whose mean
per-frame score is > 0.05: per-frame RLE masks at the original frame size, category from the
checkpoint's recorded category_ids, score = that mean.
Knobs (InferenceConfig in pmvis/models/vis/inference.py) come from the defaults, then
--config INFER.yaml, then --set KEY=VALUE (value parsed as YAML, e.g. --set test_short_side=null).
RESULTS.json is written atomically; --evaluate also prints the AP table when the annotation file
has masks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmvis.jobs import add_dataset_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                        help="pmvis checkpoint file (or a directory holding checkpoint.pt)")
    add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="RESULTS.json", help="YTVIS results file to write")
    parser.add_argument("--videos", metavar="ID,ID,...", help="comma-separated video ids (default: all)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--config", type=Path, metavar="INFER.yaml", help="YAML file of InferenceConfig knobs")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="an InferenceConfig knob (value parsed as YAML); repeatable")
    parser.add_argument("--evaluate", action="store_true",
                        help="also score the results against the annotation file's masks and print the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_video_ids(text: str | None) -> list[int] | None:
    from pmvis.core.errors import PmvisError

    if text is None:
        return None
    try:
        ids = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PmvisError(f"--videos {text!r}: expected comma-separated integer video ids") from None
    if not ids:
        raise PmvisError(f"--videos {text!r}: no video ids given")
    return ids


def run(args: argparse.Namespace) -> int:
    import time

    from pmvis.core.config import build_config, load_config, parse_dotlist
    from pmvis.core.errors import PmvisError
    from pmvis.models.vis.inference import InferenceConfig, load_inference_model
    from pmvis.platform.data.results_io import save_results
    from pmvis.platform.data.ytvis_io import check_output_for_dataset, load_dataset_dir
    from pmvis.platform.predict import predict_dataset, resolve_category_ids

    overrides = parse_dotlist(args.overrides)
    if args.device is not None:
        overrides["device"] = args.device
    # --set values go through build_config, not load_config's overrides: those skip None, and
    # `--set test_short_side=null` (native size) must apply.
    config = load_config(InferenceConfig, args.config)
    config = build_config(InferenceConfig, {**config.model_dump(), **overrides}, source="--set")
    dataset = load_dataset_dir(args.data, args.annotations)
    check_output_for_dataset(args.out, dataset)
    video_ids = parse_video_ids(args.videos)
    if video_ids is not None:
        unknown = [v for v in video_ids if v not in dataset.videos]
        if unknown:
            raise PmvisError(f"--videos: ids {unknown} are not videos of {dataset.path}")
    if args.evaluate and not any(s is not None for a in dataset.annotations for s in a.segmentations):
        raise PmvisError(f"--evaluate: {dataset.path} has no masks to evaluate against (a box-only file)")

    start = time.perf_counter()
    model, model_cfg, state = load_inference_model(args.checkpoint, config)
    category_ids = resolve_category_ids(state, dataset, model_cfg.num_classes)
    results = predict_dataset(model, dataset, config, category_ids=category_ids, video_ids=video_ids,
                              progress=not args.no_progress)
    save_results(results, args.out)
    n_videos = len(video_ids) if video_ids is not None else len(dataset.videos)
    print(f"pmvis predict: {len(results)} tracks in {n_videos} videos written to {args.out} "
          f"({time.perf_counter() - start:.1f} s on {next(model.parameters()).device})")
    if args.evaluate:
        from pmvis.platform.evaluation import evaluate_ytvis, format_metrics_table

        gt = dataset if video_ids is None else dataset.subset(video_ids)
        print(format_metrics_table(evaluate_ytvis(gt, results), title=f"{args.out} vs {dataset.path}"))
    return 0
