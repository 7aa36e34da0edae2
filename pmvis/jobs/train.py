"""Train the VIS model (IDOL-BoxInst / PM-VIS, optional TK-Loss) on Ray Train, logging to MLflow.

The config is a TrainConfig (pmvis/platform/train/config.py): sections model:, loss:, data: (at least
data.data_dir) plus the run knobs. --preset tiny starts from the CPU-sized preset for the synthetic
data; --config CFG.yaml is merged on top, then every --set KEY=VALUE (dotted keys into the nested
config, values parsed as YAML: --set model.hidden_dim=64 --set iterations=200 --set
data.short_side=[320,480]). The effective config is written to STORAGE/RUN/config.yaml.

Running again with the same run_name and storage_path resumes from the latest complete checkpoint
(model, optimizer, schedule, iteration, MLflow run), also after Ctrl-C (exit status 130). A run
already running under that name is refused. With held-out videos (data.val_fraction or
data.val_videos) the end of training evaluates them (AP/AR) and writes STORAGE/RUN/evaluation.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="CFG.yaml", help="YAML file of TrainConfig knobs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob (dotted key, YAML value); repeatable")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                        help="base values: the paper's R50 run (default) or the tiny CPU preset")
    parser.add_argument("--address", default="auto", metavar="auto|local|ADDR",
                        help="Ray cluster: auto (RAY_ADDRESS / a running cluster / else local), local, or an address")


def build_train_config(config_path: Path | None, overrides: list[str], preset: str = "paper", *,
                       base: dict | None = None):
    """The TrainConfig of a command: the preset's values (or ``base``, a command's own starting
    values), then the --config file, then every --set."""
    from pmvis.core.config import build_config, merge_values, parse_dotlist, read_config_values
    from pmvis.core.errors import PmvisError
    from pmvis.platform.train.config import TrainConfig

    source = "config" if config_path is None else str(config_path)
    values = {} if config_path is None else read_config_values(config_path)
    values = merge_values(values, parse_dotlist(overrides))
    if base is not None:
        values = merge_values(base, values)
    elif preset == "tiny":
        data_dir = (values.get("data") or {}).get("data_dir")
        if not data_dir:
            raise PmvisError(f"{source}: data.data_dir is required (e.g. --set data.data_dir=DIR)")
        values = merge_values(TrainConfig.tiny(data_dir).model_dump(mode="json"), values)
    if not (values.get("data") or {}).get("data_dir"):
        raise PmvisError(f"{source}: data.data_dir is required (e.g. --set data.data_dir=DIR)")
    return build_config(TrainConfig, values, source=source)


def format_result(result) -> str:
    from pmvis.platform.evaluation import METRIC_NAMES

    m = result.metrics
    lines = [f"pmvis train: run {result.run_name} — iteration {result.iteration}"
             + (f" (resumed at {result.start_iteration})" if result.start_iteration else "")]
    main = ["loss", "class", "l1", "giou", "proj", "pairwise", "pseudo_focal", "pseudo_dice", "mask_focal",
            "mask_dice", "tk", "track", "track_aux", "lr", "it_per_s"]
    rows = [(k, m[k]) for k in main if isinstance(m.get(k), (int, float))]
    width = max((len(k) for k, _ in rows), default=0)
    lines += [f"  {k:<{width}}  {v:.6g}" for k, v in rows]
    if result.evaluation:
        ev = result.evaluation

        def fmt(v):
            return "   -  " if v is None else f"{v:6.2f}"

        lines.append("held-out evaluation:")
        lines.append("  " + "  ".join(f"{n:>6}" for n in METRIC_NAMES))
        lines.append("  " + "  ".join(fmt(ev.get(n)) for n in METRIC_NAMES))
    else:
        lines.append("held-out evaluation: none (no held-out videos, or the inference module is not available)")
    lines.append(f"checkpoint:      {result.checkpoint}")
    if result.best_checkpoint != result.checkpoint:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    lines.append(f"config:          {result.config_path}")
    lines.append(f"MLflow run:      {result.mlflow_run_id} ({result.tracking_uri})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pmvis.platform.cluster import connect
    from pmvis.platform.train.driver import preflight, run_dir_of, run_lock, run_training

    cfg = build_train_config(args.config, args.overrides, args.preset)
    cfg, _ = preflight(cfg)  # bad data or an incompatible checkpoint: fail before Ray starts
    with run_lock(run_dir_of(cfg)):  # the same run already running: fail before Ray starts
        connect(args.address)
        result = run_training(cfg)
    print(format_result(result))
    return 0
