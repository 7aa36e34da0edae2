"""Sweep fusion / filter / loss knobs with Ray Tune: re-fuse from the cached raw masks, train, rank on held-out AP.

Each trial applies its sampled knobs of the search space (a packaged name — see
pmvis/search_spaces — or a YAML file; knob roots fuse.*, filter.*, loss.*) to the base configs,
re-fuses (and, with filter.* knobs or --filter on, re-filters) the ground truth of --data from the
raw pseudo-mask store OUT/raw into its own directory (the mask models are not run again), then
trains a Ray Train TorchTrainer (TrainConfig: --preset, then --set KEY=VALUE; keys fuse.* and
filter.* set the base FuseConfig / FilterConfig instead) and reports the held-out eval_AP at every
checkpoint to Tune (ASHA stops weak trials early). Trials run as many at once as the cluster fits.

Each trial is one MLflow run in experiment NAME (params: the sampled knobs; metrics: eval_AP and
the losses); the trainer's own runs go to NAME-train. Everything lives in STORAGE/NAME; running
the same --name again resumes the sweep (finished trials kept, unfinished and failed ones rerun and
resume their training). At the end a table of the trials is printed, best first: those that trained
the whole budget, then those the scheduler stopped early (status `stopped`), then failed ones; the best
trial's TrainConfig is written to STORAGE/NAME/best_config.yaml (usable with
`pmvis train --config`), its knobs and fuse/filter configs to best_trial.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmvis.jobs import add_pseudo_masks_argument
from pmvis.platform.tune.config import SCHEDULERS, SEARCHES, SweepConfig


def _default(name: str):
    """SweepConfig's default for a flag: stated once, there."""
    return SweepConfig.__dataclass_fields__[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, metavar="NAME|FILE", help="search space: packaged name or YAML file")
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset directory (annotations.json + JPEGImages/)")
    add_pseudo_masks_argument(parser)
    parser.add_argument("--samples", type=int, default=_default("samples"), metavar="N",
                        help=f"trials to draw (× the grid size) (default {_default('samples')})")
    parser.add_argument("--search", choices=SEARCHES, default=_default("search"),
                        help="random draws; grid: every choice knob as a grid; optuna: TPE")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=_default("scheduler"),
                        help="asha: stop weak trials early on eval_AP; fifo: run every trial to the end")
    parser.add_argument("--gpus-per-trial", type=int, default=_default("gpus_per_trial"), metavar="G",
                        help="GPUs per trial (one per Train worker); 0 = CPU (default)")
    parser.add_argument("--name", default=_default("name"), help="sweep name: STORAGE/NAME and the MLflow experiment; the same name resumes")
    parser.add_argument("--storage", type=Path, default=Path(_default("storage_path")), metavar="PATH",
                        help=f"where sweeps live (default {_default('storage_path')})")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default MLFLOW_TRACKING_URI or ./mlflow sqlite)")
    parser.add_argument("--iterations", type=int, metavar="N", help="training iterations per trial")
    parser.add_argument("--preset", choices=("paper", "tiny"), default=_default("preset"), help="TrainConfig base values")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig knob (or fuse.* / filter.* base knob); repeatable")
    parser.add_argument("--filter", choices=("auto", "on", "off"), default=_default("filter"),
                        help="filter the ground truth per trial (auto: when the space has filter.* knobs)")
    parser.add_argument("--max-concurrent", type=int, metavar="N", help="trials at once (default: what the cluster fits)")
    parser.add_argument("--seed", type=int, metavar="N", help="search seed: the same seed draws the same trials (default unseeded)")
    parser.add_argument("--trial-retries", type=int, metavar="N",
                        help="rerun a failed trial up to N times, resuming its training from its last "
                             f"checkpoint (default {_default('trial_retries')})")
    parser.add_argument("--address", default="auto", metavar="auto|local|ADDR",
                        help="Ray cluster: auto (RAY_ADDRESS / a running cluster / else local), local, or an address")


def build_sweep_config(args: argparse.Namespace):
    from pmvis.core.config import parse_dotlist
    from pmvis.platform.tune.trials import split_overrides

    train, fuse, filt = split_overrides(parse_dotlist(args.overrides))
    return SweepConfig(space=args.space, data_dir=str(args.data), pseudo_masks=str(args.pseudo_masks), name=args.name,
                       storage_path=str(args.storage), samples=args.samples, search=args.search,
                       scheduler=args.scheduler, gpus_per_trial=args.gpus_per_trial, iterations=args.iterations,
                       preset=args.preset, train_overrides=train, fuse_overrides=fuse, filter_overrides=filt,
                       filter=args.filter, tracking_uri=args.tracking_uri, max_concurrent=args.max_concurrent,
                       seed=args.seed,
                       **({} if args.trial_retries is None else {"trial_retries": args.trial_retries}))


def run(args: argparse.Namespace) -> int:
    from pmvis.platform.cluster import connect
    from pmvis.platform.tune.results import format_sweep_result
    from pmvis.platform.tune.sweep import prepare_sweep, run_sweep

    cfg = build_sweep_config(args)
    plan = prepare_sweep(cfg)  # every input check, before Ray starts
    connect(args.address)
    result = run_sweep(cfg, plan)
    print(format_sweep_result(result))
    return 0 if result.best is not None else 1
