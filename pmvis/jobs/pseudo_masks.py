"""Generate pseudo masks from the ground-truth boxes with several sources on Ray Data.

Writes OUT/raw/ (Parquet, one file per source and video: per-frame RLE masks and confidences)
and OUT/manifest.json. Model sources (hqsam, track) run in actor pools with --gpus-per-actor
GPUs each; grabcut runs in CPU tasks. Source options: --option SOURCE.KEY=VALUE, e.g.
--option hqsam.model_type=vit_b --option hqsam.checkpoint=/ckpt/sam_hq_vit_b.pth.

Every input (annotation file, source options, checkpoint files) is checked before Ray starts.
A rerun into the same OUT skips the videos a source has stored, but only if they were made from
the same inputs: that source's options (--actors and --gpus-per-actor aside), its checkpoint
files, --data, the annotation file's content and the masks it starts from. If any of them
differs, that source's stored videos are deleted and regenerated, and the run says so.
OUT/manifest.json records, per source, what its stored files were made from. Videos that fail
(a source error, or a worker that crashed on every attempt) are listed at the end and the
command exits non-zero.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset dir (annotations.json, JPEGImages/)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output dir (raw/ and manifest.json)")
    parser.add_argument("--sources", help="comma-separated sources, e.g. grabcut,hqsam,track (default: grabcut)")
    parser.add_argument("--config", type=Path, metavar="PM.yaml", help="YAML of PseudoMaskConfig knobs")
    parser.add_argument("--annotations", help="annotation file inside DIR (default annotations.json)")
    parser.add_argument("--option", action="append", default=[], metavar="SOURCE.KEY=VALUE",
                        help="a source option (value parsed as YAML); repeatable")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per model-source actor (default 0: CPU)")
    parser.add_argument("--actors", type=int, help="actor-pool size per model source (default 1)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (on driver and workers) to register extra sources")
    parser.add_argument("--address", default="auto",
                        help="Ray: auto (RAY_ADDRESS / running cluster / local), local, or an address")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_options(items: list[str]) -> dict[str, dict]:
    """['hqsam.model_type=vit_b', ...] -> {'hqsam': {'model_type': 'vit_b'}} (values as YAML)."""
    from pmvis.core.config import parse_dotlist
    from pmvis.core.errors import PmvisError

    for item in items:
        source, dot, knob = item.partition("=")[0].partition(".")
        if "=" not in item or not dot or not source.strip() or not knob.strip():
            raise PmvisError(f"--option {item!r}: expected SOURCE.KEY=VALUE")
    return parse_dotlist(items, flag="--option")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.config import load_config
    from pmvis.platform.cluster import connect
    from pmvis.platform.pseudo.generate import generate_pseudo_masks
    from pmvis.platform.pseudo.plan import PseudoMaskConfig, prepare_pseudo_masks

    config = load_config(PseudoMaskConfig, args.config)
    updates: dict = {}
    if args.sources:
        updates["sources"] = [s.strip() for s in args.sources.split(",") if s.strip()]
    if args.plugin:
        updates["plugins"] = list(config.plugins) + args.plugin
    options = {k: dict(v) for k, v in config.source_options.items()}
    for source, knobs in parse_options(args.option).items():
        options.setdefault(source, {}).update(knobs)
    for source in updates.get("sources", config.sources):
        if args.gpus_per_actor is not None:
            options.setdefault(source, {}).setdefault("num_gpus", args.gpus_per_actor)
        if args.actors is not None:
            options.setdefault(source, {}).setdefault("actors", args.actors)
    updates["source_options"] = options
    config = load_config(PseudoMaskConfig, None, {**config.model_dump(), **updates})

    plan = prepare_pseudo_masks(args.data, args.out, config, annotations=args.annotations)  # before Ray starts
    connect(args.address)
    summary = generate_pseudo_masks(args.data, args.out, config, annotations=args.annotations,
                                    progress=not args.no_progress, plan=plan)
    for name, why in summary.regenerated.items():
        print(f"{name}: stored videos were made from other inputs ({why}): regenerated")
    for name in config.sources:
        print(f"{name}: {summary.written.get(name, 0)} videos written, {summary.skipped.get(name, 0)} already stored")
    print(f"raw pseudo masks in {args.out / 'raw'} ({summary.seconds:.1f} s)")
    return 0
