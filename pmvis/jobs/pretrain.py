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
from typing import Any

# Synthetic stills come from a seed range the demo and benchmarks never use for their own data.
PRETRAIN_SYNTH_SEED = 1000
PRETRAIN_SYNTH_FRAMES = 4
PRETRAIN_RUN_NAME = "pretrain"
DEMO_PRETRAIN_VIDEOS = 300  # --synthetic N of the shipped demo weights
# The tiny preset's pretraining recipe (on top of TrainConfig.tiny): longer than a demo training,
# every frame of the pseudo clip supervised, lr warm-up and one step near the end. 16k iterations
# (~40 min on 2 cores): the start's held-out AP on the demo's seeds 0/1/2 went 12.2/20.1/15.3 with
# 8k to 27.0/24.8/21.1 (benchmarks/README.md, time to accuracy).
TINY_PRETRAIN: dict[str, Any] = {
    "iterations": 16000, "lr_steps": [13600], "checkpoint_every": 1000, "log_every": 50, "print_every": 100,
    "loss": {"mode": "boxinst", "loss_frames": "all"},
    "data": {"val_fraction": 0.0},
}


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
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                        help="base values: the paper's R50 model (default) or the tiny CPU preset")
    parser.add_argument("--export", type=Path, metavar="FILE",
                        help="also write the final weights here as a compact float16 checkpoint")
    parser.add_argument("--address", default="auto", metavar="auto|local|ADDR",
                        help="Ray cluster: auto (RAY_ADDRESS / a running cluster / else local), local, or an address")


def pretrain_config(args: argparse.Namespace, data_dir: Path, annotations: str, images: str) -> Any:
    """The TrainConfig of a pretraining run: data.format coco on top of the preset, then the
    user's --config and --set."""
    from pmvis.jobs.train import build_train_config
    from pmvis.platform.train.config import TrainConfig
    from pmvis.core.config import merge_values

    from pmvis.platform.experiments import default_tracking_uri

    # everything of a pretraining run lives under --out (MLFLOW_TRACKING_URI still wins)
    base: dict[str, Any] = {"run_name": PRETRAIN_RUN_NAME, "storage_path": str(args.out / "runs"),
                            "experiment": "pmvis-pretrain", "tracking_uri": default_tracking_uri(args.out / "mlflow")}
    if args.preset == "tiny":
        base = merge_values(TrainConfig.tiny(data_dir).model_dump(mode="json"), merge_values(base, TINY_PRETRAIN))
    base = merge_values(base, {"data": {"data_dir": str(data_dir), "format": "coco", "annotations": annotations,
                                        "image_dir": images}})
    return build_train_config(args.config, args.overrides, "none", base=base)


def make_synthetic_stills(out: Path, videos: int, seed: int, size: tuple[int, int] | None = None) -> Path:
    """Synthetic videos under ``out`` with every frame listed as a COCO still (true boxes only)."""
    from pmvis.core.config import build_config
    from pmvis.platform.data.synthetic_scenes import SynthConfig
    from pmvis.platform.data.synthetic import generate_synthetic, write_coco_stills

    values: dict[str, Any] = {"videos": videos, "frames": PRETRAIN_SYNTH_FRAMES, "seed": seed}
    if size is not None:
        values.update(height=size[0], width=size[1])
    generate_synthetic(out, build_config(SynthConfig, values, source="pretrain"), overwrite=True, progress=True)
    return write_coco_stills(out, boxes_only=True)


def run_pretrain(args: argparse.Namespace) -> Any:
    """Make the stills when asked, train on the connected Ray (connecting per ``args.address``
    unless Ray is up), print the result and export the weights; returns (TrainResult, export path)."""
    import ray

    from pmvis.jobs.train import format_result
    from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME, export_weights
    from pmvis.platform.cluster import connect
    from pmvis.core.errors import PmvisError
    from pmvis.platform.train.driver import preflight, run_dir_of, run_lock, run_training

    if args.synthetic is not None:
        if args.synthetic < 1:
            raise PmvisError(f"--synthetic must be ≥ 1, got {args.synthetic}")
        stills = args.out.resolve() / "stills"
        coco = make_synthetic_stills(stills, args.synthetic, args.seed)
        print(f"pmvis pretrain: {args.synthetic} synthetic videos (seed {args.seed}) as stills: {coco}")
        cfg = pretrain_config(args, stills, coco.name, "JPEGImages")
    else:
        cfg = pretrain_config(args, args.data, args.annotations, args.images)
    cfg, _ = preflight(cfg)  # a malformed COCO file or missing images fail here, before Ray starts
    with run_lock(run_dir_of(cfg)):  # the same run already running: fail before Ray starts
        if not ray.is_initialized():
            connect(args.address)
        result = run_training(cfg)
    print(format_result(result))
    exported = None
    if args.export is not None and result.checkpoint is not None:
        exported = export_weights(Path(result.checkpoint) / CHECKPOINT_FILENAME, args.export,
                                  extra={"pretrain": {"synthetic_videos": args.synthetic, "stills_seed": args.seed,
                                                      "iterations": result.iteration, "loss_mode": cfg.loss.mode,
                                                      "seed": cfg.seed}})
        print(f"exported weights: {exported} ({exported.stat().st_size / 1e6:.1f} MB)")
    return result, exported


def pretrain_demo_weights(out: Path) -> Path:
    """``pmvis pretrain --synthetic 300 --preset tiny --export OUT/tiny_synthetic.pt`` (the command
    that made the shipped weights), on the Ray the caller is connected to."""
    from pmvis.models.weights import TINY_PRETRAINED

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--synthetic", str(DEMO_PRETRAIN_VIDEOS), "--preset", "tiny", "--out", str(out),
                              "--export", str(out / TINY_PRETRAINED)])
    _, exported = run_pretrain(args)
    return exported


def run(args: argparse.Namespace) -> int:
    run_pretrain(args)
    return 0
