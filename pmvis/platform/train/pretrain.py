"""Pretraining on still images made into pseudo videos (IDOL's COCO recipe), boxes only.

IDOL pretrains on COCO by making each image a short clip of random views of itself (random zoom
and shift per frame, :mod:`pmvis.platform.data.pseudo_video`), so the detector and the tracking
embedding learn before any video is seen. The stills are a COCO instances file, or synthetic
stills (every frame of N synthetic videos, true boxes only). Training is `pmvis train`'s (same
config, overrides, checkpoints, resume, MLflow, progress) with ``loss.mode: boxinst`` by default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from pmvis.core.config import build_config, merge_values
from pmvis.core.errors import PmvisError
from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME, export_weights
from pmvis.models.weights import TINY_PRETRAINED
from pmvis.platform.cluster import connect
from pmvis.platform.data.synthetic import generate_synthetic, write_coco_stills
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.experiments import default_tracking_uri
from pmvis.platform.train.config import TrainConfig, train_config_from
from pmvis.platform.train.driver import TrainResult, format_train_result, preflight, run_dir_of, run_lock, run_training
from pmvis.platform.train.recipes import (
    DEMO_PRETRAIN_VIDEOS,
    FILE_PRESETS,
    PRETRAIN_RUN_NAME,
    PRETRAIN_SYNTH_FRAMES,
    PRETRAIN_SYNTH_SEED,
    TINY_PRETRAIN,
    preset_values,
)


def pretrain_config(*, data_dir: Path, annotations: str, images: str, out: Path, preset: str,
                    config_path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a pretraining run: data.format coco on top of the preset (everything of the
    run under ``out``; MLFLOW_TRACKING_URI still wins), then the user's config file and overrides."""
    base: dict[str, Any] = {"run_name": PRETRAIN_RUN_NAME, "storage_path": str(out / "runs"),
                            "experiment": "pmvis-pretrain", "tracking_uri": default_tracking_uri(out / "mlflow")}
    if preset == "tiny":
        base = merge_values(TrainConfig.tiny(data_dir).model_dump(mode="json"), merge_values(base, TINY_PRETRAIN))
    elif preset in FILE_PRESETS:
        base = merge_values(preset_values(preset), base)
    base = merge_values(base, {"data": {"data_dir": str(data_dir), "format": "coco", "annotations": annotations,
                                        "image_dir": images}})
    return train_config_from(config_path, list(overrides or []), "none", base=base)


def make_synthetic_stills(out: Path, videos: int, seed: int, size: tuple[int, int] | None = None) -> Path:
    """Synthetic videos under ``out`` with every frame listed as a COCO still (true boxes only)."""
    values: dict[str, Any] = {"videos": videos, "frames": PRETRAIN_SYNTH_FRAMES, "seed": seed}
    if size is not None:
        values.update(height=size[0], width=size[1])
    generate_synthetic(out, build_config(SynthConfig, values, source="pretrain"), overwrite=True, progress=True)
    return write_coco_stills(out, boxes_only=True)


def run_pretrain(*, out: Path, synthetic: int | None = None, seed: int = PRETRAIN_SYNTH_SEED,
                 data: Path | None = None, annotations: str = "annotations.json", images: str = "images",
                 preset: str = "paper", config_path: str | os.PathLike | None = None,
                 overrides: list[str] | None = None, export: Path | None = None,
                 address: str = "auto") -> tuple[TrainResult, Path | None]:
    """Make the stills when asked (``synthetic`` videos), train on the connected Ray (connecting per
    ``address`` unless Ray is up), print the result and export the weights; returns (result, export path)."""
    if synthetic is not None:
        if synthetic < 1:
            raise PmvisError(f"--synthetic must be ≥ 1, got {synthetic}")
        stills = out.resolve() / "stills"
        coco = make_synthetic_stills(stills, synthetic, seed)
        print(f"pmvis pretrain: {synthetic} synthetic videos (seed {seed}) as stills: {coco}")
        cfg = pretrain_config(data_dir=stills, annotations=coco.name, images="JPEGImages", out=out, preset=preset,
                              config_path=config_path, overrides=overrides)
    else:
        if data is None:
            raise PmvisError("pretraining needs --data (a COCO image set) or --synthetic N")
        cfg = pretrain_config(data_dir=data, annotations=annotations, images=images, out=out, preset=preset,
                              config_path=config_path, overrides=overrides)
    cfg, _ = preflight(cfg)  # a malformed COCO file or missing images fail here, before Ray starts
    with run_lock(run_dir_of(cfg)):  # the same run already running: fail before Ray starts
        if not ray.is_initialized():
            connect(address)
        result = run_training(cfg)
    print(format_train_result(result))
    exported = None
    if export is not None and result.checkpoint is not None:
        exported = export_weights(Path(result.checkpoint) / CHECKPOINT_FILENAME, export,
                                  extra={"pretrain": {"synthetic_videos": synthetic, "stills_seed": seed,
                                                      "iterations": result.iteration, "loss_mode": cfg.loss.mode,
                                                      "seed": cfg.seed}})
        print(f"exported weights: {exported} ({exported.stat().st_size / 1e6:.1f} MB)")
    return result, exported


def pretrain_demo_weights(out: Path) -> Path:
    """``pmvis pretrain --synthetic 300 --preset tiny --export OUT/tiny_synthetic.pt`` (the command
    that made the shipped weights), on the Ray the caller is connected to."""
    _, exported = run_pretrain(out=out, synthetic=DEMO_PRETRAIN_VIDEOS, seed=PRETRAIN_SYNTH_SEED, preset="tiny",
                               export=out / TINY_PRETRAINED)
    return exported
