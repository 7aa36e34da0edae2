"""What a sweep is asked to do (:class:`SweepConfig`) and the names of what it writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

METRIC = "eval_AP"


MODE = "max"


SEARCHES = ("random", "grid", "optuna")


SCHEDULERS = ("asha", "fifo")


TRIALS_DIRNAME = "pmvis_trials"


TRAIN_RUN_NAME = "train"


CLEAN_FILENAME = "clean.json"


PSEUDO_FILENAME = "pseudo.json"


RESULTS_FILENAME = "results.json"


BEST_CONFIG_FILENAME = "best_config.yaml"


BEST_TRIAL_FILENAME = "best_trial.yaml"


TRAIN_ROOTS = ("loss",)  # knob roots that live inside the TrainConfig


# Tune's console output: status tables only (3, its default, also prints every trial's full
# result table at every report: dozens of loss terms that MLflow and `pmvis compare` show better).
TUNE_VERBOSITY = 1


@dataclass
class SweepConfig:
    """Everything :func:`run_sweep` needs (the CLI builds it from its flags)."""

    space: str  # packaged space name or YAML file
    data_dir: str
    pseudo_masks: str  # `pmvis pseudo-masks` output dir (OUT, reads OUT/raw) or the store itself
    name: str = "pmvis-sweep"
    storage_path: str = "./pmvis-sweeps"
    samples: int = 10
    search: str = "random"
    scheduler: str = "asha"
    gpus_per_trial: int = 0  # > 0: use_gpu, num_workers = gpus_per_trial (one GPU per worker)
    iterations: int | None = None
    preset: str = "paper"
    train_overrides: dict[str, Any] = field(default_factory=dict)  # nested TrainConfig values
    fuse_overrides: dict[str, Any] = field(default_factory=dict)  # nested FuseConfig values
    filter_overrides: dict[str, Any] = field(default_factory=dict)  # nested FilterConfig values
    filter: str = "auto"  # auto: filter the ground truth when the space has filter.* knobs; on; off
    tracking_uri: str | None = None
    max_concurrent: int | None = None  # None: from the cluster's resources
    seed: int | None = None  # search seed (random draws, optuna's sampler); None: unseeded
    # Tune reruns a trial that failed (a lost node, a crashed trial driver) this many times; its
    # training resumes from the trial's last checkpoint. Failures inside training are retried by
    # Train first (TrainConfig.max_failures).
    trial_retries: int = 1
