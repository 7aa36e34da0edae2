"""Run the embedded default end to end on a local Ray: data → box-only model → pseudo masks → PM-VIS.

1. a synthetic YouTube-VIS set under OUT/data (boxes, defective masks, true masks; --seed S);
2. the "filled box as mask" baseline and the defective annotation masks scored against the truth;
3. a box-only IDOL-BoxInst model (tiny) trained with Ray Train — also the `boxinst` source;
4. pseudo masks from the boxes on Ray Data: GrabCut, the optical-flow tracker seeded with them and
   the box-only model; HQ-SAM (vit_tiny) and a SAM 2 (tiny) tracker join when their checkpoints
   are given (--hqsam-checkpoint, --sam2-checkpoint: with random weights they only add noise);
5. DOOB/SCM/SHQM fusion into training annotations and the RIA / Missing-Data filters;
6. PM-VIS (box-only losses + fused pseudo masks) and fully supervised models trained with the same
   budget, all three evaluated on the same held-out videos against the true masks
   (OUT/comparison.md and OUT/comparison.json);
7. a 4-trial Ray Tune sweep (space ``demo``: PM-VIS knobs) that re-fuses the cached raw masks per
   trial, ranked on held-out AP, then `pmvis compare` of its MLflow runs (table + plot);
8. a quality report (plots, filter precision/recall); everything logged to MLflow under OUT/mlflow,
   and a closing summary: the AP table, where the plots are, the `mlflow ui` command.

Every training (the three models and the sweep's trials) starts from the same box-supervised
pretrained weights: the tiny model pretrained on synthetic stills made into pseudo videos with box
labels only (`pmvis pretrain`, IDOL's COCO recipe), shipped with the package
(pmvis/models/weights/); no mask label is seen before the three runs diverge. --pretrain
regenerates those weights first (the documented pretrain command, ~35 min on 2 cores) instead of
loading them; --no-pretrained trains from scratch.
"""

from __future__ import annotations

import argparse

from pmvis.platform.demo.config import (
    DEMO_ITERATIONS,
    DEMO_SOURCES,
    DEMO_SWEEP_TRIALS,
    TINY_ITERATIONS,
    DemoConfig,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--out", default=defaults.out, metavar="DIR",
                        help=f"output directory (default ./{defaults.out}; its dataset is regenerated each run)")
    parser.add_argument("--seed", type=int, default=None, help="synthetic data seed (default 0)")
    parser.add_argument("--sources", default=",".join(DEMO_SOURCES),
                        help=f"pseudo-mask sources (default {','.join(DEMO_SOURCES)})")
    parser.add_argument("--hqsam-checkpoint", help="a real sam_hq_vit_tiny.pth (else random weights)")
    parser.add_argument("--sam2-checkpoint", help="a real sam2.1_hiera_tiny.pt (else random weights)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"training iterations per model (default {DEMO_ITERATIONS}; --tiny {TINY_ITERATIONS})")
    parser.add_argument("--sweep-trials", type=int, default=DEMO_SWEEP_TRIALS, metavar="N",
                        help=f"trials of the closing sweep (default {DEMO_SWEEP_TRIALS}; 0 skips it)")
    parser.add_argument("--tiny", action="store_true", help="a very small dataset and short training, for tests")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrain", action="store_true",
                       help="regenerate the pretrained start point with `pmvis pretrain` instead of loading the shipped one")
    start.add_argument("--no-pretrained", action="store_true", help="train every model from scratch")


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The flags as a DemoConfig (a bad value is a PmvisError naming the flag's field)."""
    from pmvis.core.config import build_config

    start = "pretrain" if args.pretrain else "scratch" if args.no_pretrained else "shipped"
    return build_config(DemoConfig, {
        "out": str(args.out), "seed": args.seed, "sources": [s.strip() for s in args.sources.split(",") if s.strip()],
        "hqsam_checkpoint": args.hqsam_checkpoint, "sam2_checkpoint": args.sam2_checkpoint,
        "iterations": args.iterations, "sweep_trials": args.sweep_trials, "tiny": args.tiny, "start": start,
    }, source="pmvis demo")


def run(args: argparse.Namespace) -> int:
    from pmvis.platform.demo.run import run_demo

    return run_demo(demo_config(args))
