"""One sweep trial: its knobs onto the base configs, a re-fusion (and re-filtering) of the cached raw
pseudo masks into its own directory, then a training run reporting held-out AP to Tune.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pmvis.core.config import apply_dotted, build_config, dump_config, merge_values
from pmvis.core.errors import PmvisError
from pmvis.core.io import write_json_atomic, write_text_atomic
from pmvis.models.fusion import FuseConfig
from pmvis.platform.data.ytvis_io import load_dataset_dir, save_ytvis
from pmvis.platform.pseudo.filters import FilterConfig
from pmvis.platform.pseudo.refine import refine
from pmvis.platform.train.config import TrainConfig
from pmvis.platform.train.driver import run_training
from pmvis.platform.tune.config import (
    CLEAN_FILENAME,
    PSEUDO_FILENAME,
    TRAIN_ROOTS,
    TRAIN_RUN_NAME,
    TRIALS_DIRNAME,
    SweepConfig,
)
from pmvis.platform.tune.knobs import base_config


def split_overrides(values: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Nested ``--set`` values → (TrainConfig values, FuseConfig values, FilterConfig values):
    the top-level keys ``fuse`` and ``filter`` go to those configs, everything else to training."""
    train = {k: copy.deepcopy(v) for k, v in values.items() if k not in ("fuse", "filter")}
    fuse = copy.deepcopy(values.get("fuse") or {})
    filt = copy.deepcopy(values.get("filter") or {})
    for key, v in (("fuse", fuse), ("filter", filt)):
        if not isinstance(v, dict):
            raise PmvisError(f"--set {key}=...: set its fields, e.g. --set {key}.<field>=VALUE")
    return train, fuse, filt


def base_train_values(cfg: SweepConfig) -> dict[str, Any]:
    """The TrainConfig values every trial starts from (preset, --set, --iterations, sweep defaults);
    validated once here, before Ray starts."""

    values = copy.deepcopy(cfg.train_overrides)
    data = dict(values.get("data") or {})
    data["data_dir"] = str(Path(cfg.data_dir).expanduser().resolve())
    values["data"] = data
    if cfg.iterations is not None:
        values["iterations"] = cfg.iterations
    if cfg.gpus_per_trial > 0:
        values["use_gpu"] = True
        values["num_workers"] = cfg.gpus_per_trial
    values.setdefault("loss", {})
    values["loss"] = dict(values["loss"])
    values["loss"].setdefault("mode", "pmvis")  # the sweep produces the fused pseudo masks
    if cfg.preset == "tiny":
        values = merge_values(TrainConfig.tiny(data["data_dir"]).model_dump(mode="json"), values)
    elif cfg.preset != "paper":
        raise PmvisError(f"unknown preset {cfg.preset!r} (paper, tiny)")
    if "eval_every" not in cfg.train_overrides:  # every report carries eval_AP (ASHA, strict metric check)
        checked = build_config(TrainConfig, {**values, "data": {**values["data"], "pseudo_annotations": "x"}},
                               source="sweep train config")
        values["eval_every"] = checked.checkpoint_every
    # Checked with a placeholder pseudo file (each trial writes its own).
    checked = build_config(TrainConfig, {**values, "data": {**values["data"], "pseudo_annotations": "x"}},
                           source="sweep train config")
    if checked.data.val_fraction <= 0 and not checked.data.val_videos:
        raise PmvisError("a sweep ranks trials on the held-out AP: set data.val_fraction > 0 or data.val_videos")
    if checked.run_name is not None:
        raise PmvisError("run_name is set per trial by the sweep; leave it unset")
    return values


def trial_configs(knobs: Mapping[str, Any], ctx: Mapping[str, Any]) -> tuple[Any, Any | None, dict[str, Any]]:
    """(FuseConfig, FilterConfig or None, TrainConfig values without the data files) of one trial."""

    source = f"sweep {ctx['name']}"
    by_root: dict[str, dict[str, Any]] = {}
    for path, value in knobs.items():
        root, _, rest = path.partition(".")
        by_root.setdefault(root, {})[rest] = value
    unknown = sorted(set(by_root) - {"fuse", "filter", *TRAIN_ROOTS})
    if unknown:
        raise PmvisError(f"{source}: the sweep does not know where to apply the knob roots {unknown}")
    fuse_base = merge_values(base_config(["fuse"])["fuse"], ctx["fuse_overrides"])
    fuse = build_config(FuseConfig, apply_dotted(fuse_base, by_root.get("fuse", {})), source=f"{source}: fuse")
    filt = None
    if ctx["filter_on"]:
        filter_base = merge_values(base_config(["filter"])["filter"], ctx["filter_overrides"])
        if "fuse" not in ctx["filter_overrides"]:  # the GT filter's fusion follows the trial's
            filter_base["fuse"] = fuse.model_dump(mode="json")
        filt = build_config(FilterConfig, apply_dotted(filter_base, by_root.get("filter", {})),
                            source=f"{source}: filter")
    train = copy.deepcopy(ctx["train_values"])
    for root in TRAIN_ROOTS:
        if root in by_root:
            train = apply_dotted(train, {f"{root}.{k}": v for k, v in by_root[root].items()})
    return fuse, filt, train


def prepare_trial_data(trial_dir: Path, fuse: Any, filt: Any | None, ctx: Mapping[str, Any]) -> tuple[str, str]:
    """Re-fuse (and re-filter) from the raw store into ``trial_dir``; (annotations, pseudo) paths."""

    trial_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset_dir(ctx["data_dir"])
    refined = refine(ctx["raw_dir"], dataset, fuse=fuse, filt=filt, fuse_input="filtered")
    annotations_path = str(dataset.path)
    if filt is not None:
        annotations_path = str(trial_dir / CLEAN_FILENAME)
        save_ytvis(refined.cleaned, annotations_path)
        write_json_atomic(trial_dir / "filter_report.json", refined.filter_report, indent=1)
    fused = refined.fused
    pseudo_path = str(trial_dir / PSEUDO_FILENAME)
    save_ytvis(fused, pseudo_path)
    return annotations_path, pseudo_path


def trial_train_config(train_values: Mapping[str, Any], annotations: str, pseudo: str, trial_dir: Path,
                       ctx: Mapping[str, Any]) -> Any:

    values = copy.deepcopy(dict(train_values))
    data = dict(values["data"])
    if not data.get("eval_annotations"):  # score against the user's GT, not the cleaned copy
        data["eval_annotations"] = ctx["eval_annotations"]
    data.update({"annotations": annotations, "pseudo_annotations": pseudo})
    values.update({"data": data, "run_name": TRAIN_RUN_NAME, "storage_path": str(trial_dir),
                   "experiment": f"{ctx['name']}-train", "tracking_uri": ctx["tracking_uri"]})
    return build_config(TrainConfig, values, source=f"sweep {ctx['name']}: trial train config")


def knobs_from_trial_config(config: Mapping[str, Any], knob_paths: list[str]) -> dict[str, Any]:
    """The trial's knobs: the Tune config is the flat ``{knob path: value}`` dict."""
    missing = [p for p in knob_paths if p not in config]
    if missing:
        raise PmvisError(f"trial config lacks the knobs {missing}")
    return {p: config[p] for p in knob_paths}


def trial_driver(config: dict, ctx: dict) -> None:
    """Tune function trainable: one trial = fuse/filter from the raw store, then a Train V2 run."""

    knobs = knobs_from_trial_config(config, ctx["knob_paths"])
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(ctx["sweep_dir"]) / TRIALS_DIRNAME / trial_id
    fuse, filt, train_values = trial_configs(knobs, ctx)
    annotations, pseudo = prepare_trial_data(trial_dir, fuse, filt, ctx)
    write_text_atomic(trial_dir / "fuse_config.yaml", dump_config(fuse))
    if filt is not None:
        write_text_atomic(trial_dir / "filter_config.yaml", dump_config(filt))
    write_text_atomic(trial_dir / "knobs.json", json.dumps(knobs, indent=1, default=str))
    cfg = trial_train_config(train_values, annotations, pseudo, trial_dir, ctx)
    run_training(cfg, callbacks=[TuneReportCallback()])
