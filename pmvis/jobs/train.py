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

from pmvis.platform.train.recipes import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="CFG.yaml", help="YAML file of TrainConfig knobs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob (dotted key, YAML value); repeatable")
    parser.add_argument("--preset", choices=PRESETS, default="paper",
                        help="base values: paper (TrainConfig's defaults, R50), tiny (the CPU preset), or VNext "
                             "IDOL's schedule for ytvis19 / ytvis21 / ovis / coco (pretraining; coco_<dataset>: "
                             "mapped to that dataset's classes), pmvis/platform/train/presets/")
    parser.add_argument("--address", default="auto", metavar="auto|local|ADDR",
                        help="Ray cluster: auto (RAY_ADDRESS / a running cluster / else local), local, or an address")


def run(args: argparse.Namespace) -> int:
    from pmvis.platform.cluster import connect
    from pmvis.platform.train.config import train_config_from
    from pmvis.platform.train.driver import format_train_result, preflight, run_dir_of, run_lock, run_training

    cfg = train_config_from(args.config, args.overrides, args.preset)
    cfg, _ = preflight(cfg)  # bad data or an incompatible checkpoint: fail before Ray starts
    with run_lock(run_dir_of(cfg)):  # the same run already running: fail before Ray starts
        connect(args.address)
        result = run_training(cfg)
    print(format_train_result(result))
    return 0
