"""The pretraining recipe's constants, in a module light enough for the CLI's argument defaults
(no Ray, no torch): `pmvis pretrain --help` shows them without importing the training stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pmvis.core.config import merge_values, read_config_values
from pmvis.core.errors import PmvisError

PRESET_DIR = Path(__file__).with_name("presets")
# `--preset` values: "paper" (TrainConfig's defaults), "tiny" (the CPU preset), and the files of
# presets/: VNext IDOL's schedules per dataset (ytvis19, ytvis21, ovis) and its COCO pretraining (coco,
# and coco_<dataset> with the COCO → dataset category map)
FILE_PRESETS = ("ytvis19", "ytvis21", "ovis", "coco", "coco_ytvis19", "coco_ytvis21", "coco_ovis")
PRESETS = ("paper", "tiny", *FILE_PRESETS)


def preset_values(name: str) -> dict[str, Any]:
    """The TrainConfig values of a file preset (its ``inherit:`` preset's first, then its own)."""
    if name not in FILE_PRESETS:
        raise PmvisError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = read_config_values(PRESET_DIR / f"{name}.yaml")
    parent = values.pop("inherit", None)
    return merge_values(preset_values(parent), values) if parent else values

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
