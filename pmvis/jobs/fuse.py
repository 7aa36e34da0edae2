"""Fuse the raw pseudo masks into training masks (DOOB, SCM, then SHQM selection or a weighted vote).

Reads the ground truth of dataset DIR (its boxes prompt the fusion) and the raw pseudo-mask store
OUT/raw that `pmvis pseudo-masks` wrote; writes TRAIN.json: the same videos, annotation ids and
boxes with the fused pseudo masks as segmentations and per-annotation "quality",
"frame_quality" and "frame_source". Every knob is in FuseConfig (pmvis/models/fusion.py); set
them in --config FUSE.yaml. The effective config is written beside the output as
TRAIN.config.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmvis.jobs import add_dataset_arguments, add_pseudo_masks_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    add_pseudo_masks_argument(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="TRAIN.json",
                        help="fused training annotations to write")
    parser.add_argument("--config", type=Path, metavar="FUSE.yaml", help="YAML file of FuseConfig knobs")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.config import dump_config, effective_config_path, load_config
    from pmvis.core.io import write_text_atomic
    from pmvis.models.fusion import FuseConfig
    from pmvis.platform.data.ytvis_io import check_output_for_dataset, load_dataset_dir, save_ytvis
    from pmvis.platform.pseudo.refine import refine
    from pmvis.platform.pseudo.store import resolve_raw_dir

    config = load_config(FuseConfig, args.config)
    dataset = load_dataset_dir(args.data, args.annotations)
    check_output_for_dataset(args.out, dataset)
    check_output_for_dataset(effective_config_path(args.out), dataset, flag="--out's config file")
    refined = refine(resolve_raw_dir(args.pseudo_masks), dataset, fuse=config)
    fused, s = refined.fused, refined.fuse_stats
    save_ytvis(fused, args.out)
    config_file = effective_config_path(args.out)
    write_text_atomic(config_file, dump_config(config))

    n = s["fused_masks"]
    share = ", ".join(f"{src} {k} ({100 * k / n:.1f}%)" for src, k in s["chosen"].items()) if n else "none"
    mq = "n/a" if s["mean_quality"] is None else f"{s['mean_quality']:.3f}"
    print(
        f"pmvis fuse ({s['mode']}, sources {', '.join(s['sources'])}): {s['annotations']} annotations, "
        f"{s['frames_with_box']} frames with a box\n"
        f"  fused masks: {n} ({s['frames_without_fused_mask']} box frames without one: "
        f"{s['frames_no_source_mask']} no source mask, {s['frames_rejected']} none survived)\n"
        f"  per source: {share}\n"
        f"  SCM dropped: {s['scm_dropped']}; empty after DOOB: {s['empty']}\n"
        f"  mean quality: {mq}\n"
        f"  written to {args.out} (config: {config_file})"
    )
    return 0
