"""Pretrain the VIS model on still images turned into pseudo videos (IDOL's COCO recipe), boxes only.

IDOL pretrains on COCO by making each image a short clip of random views of itself (random zoom
and shift per frame, pmvis.platform.pseudo_video), so the detector and the tracking embedding
learn before any video is seen. `pmvis pretrain` reads a COCO instances file (real runs: COCO
train2017, e.g. --data /data/coco --annotations annotations/instances_train2017.json --images
train2017 with a `--set model.num_classes=...` that fits the file) or makes synthetic stills
(--synthetic N: every frame of N synthetic videos, written as OUT/stills/coco.json with the
true boxes only). It trains on Ray Train exactly as `pmvis train` does (same config, --set,
checkpoints, resume, MLflow, progress), with loss.mode boxinst by default: box labels only, so a
model pretrained here is a fair start for box-only, PM-VIS and fully supervised fine-tuning
alike. `--set loss.mode=full` pretrains with the masks instead (IDOL's own recipe), when the
file has them.

--export FILE writes the final weights as a compact float16 checkpoint, usable as `init_from`.
The demo's shipped start point (pmvis/models/weights/, see the README) is made by:

    pmvis pretrain --synthetic 300 --preset tiny --export pmvis/models/weights/tiny_synthetic.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmvis.platform.train.recipes import PRESETS, PRETRAIN_SYNTH_SEED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, metavar="DIR", help="root of a COCO-format image set")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="make the stills from N synthetic videos (every frame a still, boxes only)")
    parser.add_argument("--annotations", default="annotations.json", metavar="FILE",
                        help="COCO instances file, relative to --data or absolute (default annotations.json)")
    parser.add_argument("--images", default="images", metavar="DIR",
                        help="image directory, relative to --data or absolute (default images)")
    parser.add_argument("--seed", type=int, default=PRETRAIN_SYNTH_SEED,
                        help=f"synthetic stills seed (default {PRETRAIN_SYNTH_SEED}; the training seed is --set seed=S)")
    parser.add_argument("--out", type=Path, default=Path("pmvis-pretrain"), metavar="DIR",
                        help="where synthetic stills and the run go (default ./pmvis-pretrain)")
    parser.add_argument("--config", type=Path, metavar="CFG.yaml", help="YAML file of TrainConfig knobs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob (dotted key, YAML value); repeatable")
    parser.add_argument("--preset", choices=PRESETS, default="paper",
                        help="base values: paper (TrainConfig's defaults, R50), tiny (the CPU preset), or VNext "
                             "IDOL's schedule for ytvis19 / ytvis21 / ovis / coco (pretraining; coco_<dataset>: "
                             "mapped to that dataset's classes), pmvis/platform/train/presets/")
    parser.add_argument("--export", type=Path, metavar="FILE",
                        help="also write the final weights here as a compact float16 checkpoint")
    parser.add_argument("--address", default="auto", metavar="auto|local|ADDR",
                        help="Ray cluster: auto (RAY_ADDRESS / a running cluster / else local), local, or an address")


def run(args: argparse.Namespace) -> int:
    from pmvis.platform.train.pretrain import run_pretrain

    run_pretrain(out=args.out, synthetic=args.synthetic, seed=args.seed, data=args.data, annotations=args.annotations,
                 images=args.images, preset=args.preset, config_path=args.config, overrides=args.overrides,
                 export=args.export, address=args.address)
    return 0
