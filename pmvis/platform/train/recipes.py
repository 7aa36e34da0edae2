"""The pretraining recipe's constants, in a module light enough for the CLI's argument defaults
(no Ray, no torch): `pmvis pretrain --help` shows them without importing the training stack."""

from __future__ import annotations

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
