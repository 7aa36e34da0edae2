"""Every knob of a training run (:class:`TrainConfig`), typed and validated before Ray starts.

Defaults (docs/design.md §4.3/§4.4): AdamW lr 1e-4, backbone ×0.1, weight decay 1e-4 (Deformable
DETR / IDOL), gradient clipping of the whole model's L2 norm at 0.01 (IDOL's configs: CLIP_TYPE
full_model, CLIP_VALUE 0.01; Deformable DETR itself used 0.1 — set ``grad_clip``), PM-VIS schedule
50k iterations with the step at 8k, global batch 4 (= ``batch_size × num_workers``), 2 sampled
frames. AMP (``amp``) only applies on GPU.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from pmvis.core.config import StrictConfig, build_config, merge_values, parse_dotlist, read_config_values
from pmvis.core.errors import PmvisError
from pmvis.models.vis.config import LossConfig, ModelConfig
from pmvis.platform.data.vis_data import DataConfig
from pmvis.platform.train.recipes import FILE_PRESETS, preset_values

TINY_NUM_CLASSES = 5  # the synthetic dataset's categories (pmvis.platform.data.synthetic_scenes.CATEGORIES)
# The tiny model's inference: native size, and global mutual-best association instead of IDOL's
# detection-order matching. Measured on stored checkpoints (benchmarks/README.md, paper parity):
# mutual-best scored higher on 9 of 11 tiny models (demo seed 0; method benchmark seeds 0 and 1),
# by up to 10 AP on a 150-iteration demo model and 1.3–3.0 on seed 1's 800-iteration models; the
# paper preset keeps IDOL's rule (InferenceConfig's default).
TINY_INFERENCE: dict[str, Any] = {"test_short_side": None, "test_max_size": None, "association": "mutual_best"}


class DebugConfig(StrictConfig):
    """Fault injection for tests and drills; leave unset in real runs."""

    # Kill (os._exit) or raise in the worker of world rank ``fail_rank`` when it reaches this iteration.
    fail_at_iteration: int | None = None
    fail_rank: int = 0
    fail_mode: Literal["exit", "raise", "error"] = "exit"  # error: a PmvisError (a deterministic bad input)
    # Fail only while this file does not exist (it is created just before failing): fail once.
    fail_marker: str | None = None
    # Sleep this long before failing. Ray Train V2's controller takes in a worker's reports when it
    # polls it (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a report still queued in a worker that
    # dies is lost, so a checkpoint reported just before a crash may not be the one resumed from.
    fail_delay_s: float = Field(0.0, ge=0.0)
    # Make the loss NaN at this iteration (tests the non-finite guard).
    nan_at_iteration: int | None = None


class TrainConfig(StrictConfig):
    """Every knob of a training run. Defaults: PM-VIS / IDOL R50 (docs/design.md §4.3, §4.4); see :meth:`tiny`."""

    # inf / nan in a float knob (lr: .inf) would only surface as a diverged run, iterations later
    model_config = ConfigDict(allow_inf_nan=False)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig
    iterations: int = Field(50_000, ge=1)  # PM-VIS authors' code
    batch_size: int = Field(4, ge=1)  # clips per worker; global batch = batch_size × num_workers (PM-VIS: 4)
    lr: float = Field(1e-4, gt=0)
    backbone_lr_mult: float = Field(0.1, ge=0)
    # Backbone stages kept frozen (no gradient, fixed BatchNorm statistics), as detectron2's
    # MODEL.BACKBONE.FREEZE_AT: 0 none, 1 the stem, 2 the stem and res2 (IDOL, VNext's default).
    freeze_at: int = Field(2, ge=0)
    # Parameter-name prefix -> lr multiplier (e.g. {"mask_branch.": 10}): a group at lr × mult, ahead
    # of the backbone rule (the longest matching prefix wins). Fine-tuning a pretrained detector's mask
    # head faster than its detector; empty: every non-backbone parameter at lr.
    lr_mults: dict[str, float] = Field(default_factory=dict)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(0.01, ge=0)  # max L2 norm of all gradients together (IDOL: 0.01); 0 = off
    lr_steps: list[int] = Field(default_factory=lambda: [8000])  # iterations where lr ×= lr_gamma
    lr_gamma: float = Field(0.1, gt=0)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    eval_every: int = Field(0, ge=0)  # evaluate the held-out videos every N iterations; 0 = only at the end
    log_every: int = Field(20, ge=1)  # MLflow metrics every N iterations
    print_every: int = Field(20, ge=0)  # a progress line on the console every N iterations (rank 0); 0 = none
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)  # also torch's thread count on a CPU worker
    use_gpu: bool = False  # one GPU per worker; never on by default (a GPU request on a CPU cluster waits forever)
    amp: bool = True  # mixed precision forward on GPU (ignored on CPU)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    find_unused_parameters: bool = False  # DDP option; every IDOL parameter is used by the losses
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    run_name: str | None = None  # None: pmvis-train-<timestamp>; the same name resumes
    storage_path: str = "./pmvis-runs"
    experiment: str = "pmvis-train"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or a local sqlite store
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seeds
    init_from: str | None = None  # start from these weights (e.g. box-only → PM-VIS); ignored on resume
    # Knobs of pmvis.models.vis.inference's config for the held-out evaluation (validated there).
    inference: dict[str, Any] = Field(default_factory=dict)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @field_validator("lr_mults")
    @classmethod
    def _check_lr_mults(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if not k or not math.isfinite(m) or m < 0}
        if bad:
            raise ValueError(f"lr_mults needs non-empty parameter-name prefixes and finite multipliers ≥ 0, got {bad}")
        return v

    @field_validator("run_name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or "\\" in v or v in (".", "..")
                              or not v.isprintable()):  # NUL, newline, …: not a usable directory name
            raise ValueError(f"run_name must be a plain directory name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.loss.mode == "pmvis" and self.data.pseudo_annotations is None:
            raise ValueError("loss.mode 'pmvis' needs data.pseudo_annotations (the fused file of `pmvis fuse`)")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps must be increasing positive iterations, got {self.lr_steps}")
        return self

    @classmethod
    def tiny(cls, data_dir: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        """A CPU-sized run for tests and the demo: the tiny model on the synthetic data at its native
        size (64–128 px), lr 1e-3 with a full-rate, unfrozen backbone (it trains from scratch), a few
        iterations.
        ``overrides`` are merged into the values (nested dicts key by key)."""
        values: dict[str, Any] = {
            "model": ModelConfig.tiny(num_classes=TINY_NUM_CLASSES).model_dump(mode="json"),
            "loss": {"pairwise_warmup_iters": 50, "tk_warmup_calls": 100},  # TK: 50 iterations × 2 layers
            "data": {"data_dir": str(data_dir), "short_side": None, "max_size": None, "crop": None,
                     "val_fraction": 0.34},
            "iterations": 20, "batch_size": 2, "lr": 1e-3, "backbone_lr_mult": 1.0, "freeze_at": 0, "lr_steps": [15],
            "checkpoint_every": 10, "log_every": 5, "keep_checkpoints": 2,
            "inference": dict(TINY_INFERENCE),
        }
        return build_config(cls, merge_values(values, overrides), source="TrainConfig.tiny")


def train_config_from(config_path: str | os.PathLike | None, overrides: list[str], preset: str = "paper", *,
                      base: dict | None = None) -> TrainConfig:
    """The TrainConfig of a command: the preset's values (or ``base``, a command's own starting
    values; ``preset``: "paper" = TrainConfig's defaults, "tiny", or a file preset of
    :mod:`~pmvis.platform.train.recipes`), then the --config file, then every --set."""
    source = "config" if config_path is None else str(config_path)
    values = {} if config_path is None else read_config_values(config_path)
    values = merge_values(values, parse_dotlist(overrides))
    if base is not None:
        values = merge_values(base, values)
    elif preset in FILE_PRESETS:
        values = merge_values(preset_values(preset), values)
    elif preset == "tiny":
        data_dir = (values.get("data") or {}).get("data_dir")
        if not data_dir:
            raise PmvisError(f"{source}: data.data_dir is required (e.g. --set data.data_dir=DIR)")
        values = merge_values(TrainConfig.tiny(data_dir).model_dump(mode="json"), values)
    if not (values.get("data") or {}).get("data_dir"):
        raise PmvisError(f"{source}: data.data_dir is required (e.g. --set data.data_dir=DIR)")
    return build_config(TrainConfig, values, source=source)
