"""Generate a deterministic synthetic YouTube-VIS dataset with known annotation defects.

Writes DIR/JPEGImages/, DIR/annotations.json (with injected defects), DIR/truth.json (defect-free)
and DIR/defects.json. Values come from the defaults, then --config SYNTH.yaml, then the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset directory to create")
    parser.add_argument("--videos", type=int, help="number of videos (default 8)")
    parser.add_argument("--frames", type=int, help="frames per video (default 10)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="frame size (default 120 160)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--config", type=Path, metavar="SYNTH.yaml", help="YAML file of SynthConfig knobs")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.config import load_config
    from pmvis.platform.data.synthetic import generate_synthetic
    from pmvis.platform.data.synthetic_scenes import SynthConfig

    height, width = args.size if args.size else (None, None)
    overrides = {"videos": args.videos, "frames": args.frames, "height": height, "width": width,
                 "seed": args.seed}
    config = load_config(SynthConfig, args.config, overrides)
    s = generate_synthetic(args.out, config, overwrite=args.overwrite, progress=True)
    cats = ", ".join(f"{name} {n}" for name, n in s["instances_per_category"].items())
    defects = ", ".join(f"{n} {kind}" for kind, n in s["defects"].items())
    print(
        f"pmvis synth: {s['videos']} videos ({s['frames']} frames), {s['instances']} instances ({cats})\n"
        f"  {s['masks']} masks, {s['null_masks']} null entries, {s['occluded_masks']} occluded\n"
        f"  defects: {defects}\n"
        f"  written to {s['out_dir']} (annotations.json, truth.json, defects.json, JPEGImages/)"
    )
    return 0
