"""Hyperparameter sweeps of the PM-VIS pipeline on Ray Tune (Ray 2.60, Train V2).

A sweep searches a :mod:`pmvis.platform.tune.search_spaces` space over the knob roots ``fuse.*``
(FuseConfig), ``filter.*`` (FilterConfig) and ``loss.*`` (the TrainConfig's LossConfig). Each
trial (:func:`trial_driver`, a Tune function trainable):

1. applies its sampled knobs onto the base configs (``fuse.*`` → FuseConfig; ``filter.*`` →
   FilterConfig, whose ``filter.fuse`` follows the trial's FuseConfig unless the space sets
   ``filter.fuse.*`` itself; ``loss.*`` → the TrainConfig);
2. re-fuses and (when filtering is on) re-filters from the cached raw masks of ``OUT/raw`` — the
   mask models never run again — into its own directory ``SWEEP/pmvis_trials/<trial id>/``:
   ``clean.json`` (the filtered ground truth, the training annotations), ``pseudo.json`` (the fused
   pseudo masks of those annotations, ``data.pseudo_annotations``);
3. trains with :func:`pmvis.platform.train.driver.run_training` — a Train V2 ``TorchTrainer`` built
   inside this driver function, with ``TuneReportCallback`` so every worker report reaches Tune.
   Reports come at every checkpoint, and the sweep sets ``eval_every = checkpoint_every`` (unless
   given) so each report carries the held-out ``eval_AP`` that ASHA and the search rank on
   (Tune's time attribute ``training_iteration`` = the number of reports).

Ray 2.60 facts (docs/design.md §6): no ``Tuner(trainer)``; ``MLflowLoggerCallback`` is on the *Tuner's*
RunConfig: one MLflow run per trial in experiment NAME, params = the trial config, which is the
flat ``{knob path: value}`` dict (the param space is flat, so the params are named
``fuse.mode`` …), metrics = every reported number (``eval_AP`` …). The trainer also logs its own
MLflow run (rank 0; the whole TrainConfig as params) into experiment ``NAME-train``.

Resume: the sweep lives in ``STORAGE/NAME``; running the same name again restores it
(``Tuner.restore(..., resume_errored=True)``): finished trials are kept, unfinished and errored
ones run again and their training resumes from its last checkpoint (same trial directory, same
Train run name).

Results: ``SWEEP/results.json`` (every trial: id, status — done, stopped early by the scheduler, or
error — knobs, AP, directory; full-budget trials rank first), ``best_config.yaml``
(the best trial's full TrainConfig — its clean/pseudo annotation files — that
``pmvis train --config`` accepts; the knobs are in a header comment) and ``best_trial.yaml``
(trial id, AP, knobs, the effective FuseConfig / FilterConfig).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.core.io import write_json_atomic
from pmvis.platform.data.ytvis_io import load_dataset_dir
from pmvis.platform.experiments import (
    ResumableMLflowLoggerCallback,
    close_running_runs,
    default_tracking_uri,
    ensure_experiment,
)
from pmvis.platform.pseudo.store import resolve_raw_dir
from pmvis.platform.train.config import TrainConfig
from pmvis.platform.tune.config import (
    METRIC,
    MODE,
    RESULTS_FILENAME,
    SCHEDULERS,
    SEARCHES,
    TRAIN_RUN_NAME,
    TRIALS_DIRNAME,
    TUNE_VERBOSITY,
    SweepConfig,
)
from pmvis.platform.tune.results import SweepResult, collect_rows, write_best
from pmvis.platform.tune.search_spaces import load_space
from pmvis.platform.tune.trials import base_train_values, trial_configs, trial_driver

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- Tune setup


def param_space(space: Any, search: str) -> dict[str, Any]:
    """The flat Tune param space ``{knob path: distribution}``; ``grid`` turns every choice knob
    into a grid (continuous knobs stay random draws, one per grid point and sample)."""
    out = {}
    for path, knob in space.knobs.items():
        if search == "grid" and knob.kind == "choice":
            from ray import tune

            out[path] = tune.grid_search(copy.deepcopy(list(knob.args)))
        else:
            out[path] = knob.to_tune()
    return out


def check_search(space: Any, search: str) -> None:
    """Fail before Ray starts on a search the space or the environment cannot run."""
    if search not in SEARCHES:
        raise PmvisError(f"unknown search {search!r} ({', '.join(SEARCHES)})")
    if search != "optuna":
        return
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise PmvisError("--search optuna needs the optuna package, which is not installed in this "
                         "environment; use --search random or grid") from None
    if any(k.kind == "grid" for k in space.knobs.values()):
        raise PmvisError(f"{space.source}: optuna cannot search grid knobs; use choice instead")


def build_search_alg(space: Any, search: str, seed: int | None, max_concurrent: int) -> Any:
    """random/grid: Tune's BasicVariantGenerator (draws and grid_search expansion), seeded when
    ``seed`` is given; optuna: TPE behind a ConcurrencyLimiter. Either runs ``max_concurrent``
    trials at once (a search algorithm passed to the Tuner ignores ``max_concurrent_trials``)."""
    check_search(space, search)
    if search != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)

    return ConcurrencyLimiter(OptunaSearch(metric=METRIC, mode=MODE, seed=seed), max_concurrent=max_concurrent)


def build_scheduler(scheduler: str, train_values: Mapping[str, Any]) -> Any:
    if scheduler == "fifo":
        return FIFOScheduler()
    if scheduler != "asha":
        raise PmvisError(f"unknown scheduler {scheduler!r} ({', '.join(SCHEDULERS)})")

    t = build_config(TrainConfig, {**train_values, "data": {**train_values["data"], "pseudo_annotations": "x"}},
                     source="sweep train config")
    every = min(t.checkpoint_every, t.eval_every or t.checkpoint_every)
    reports = max(1, math.ceil(t.iterations / every))  # reports per trial
    # Rungs only before the last report, and no stop at max_t: a trial that is not cut early ends
    # by returning, so its training finishes cleanly (final evaluation, MLflow run closed) instead
    # of being killed right after its last report.
    return ASHAScheduler(time_attr="training_iteration", max_t=max(1, reports - 1), grace_period=1,
                         reduction_factor=2, stop_last_trials=False)


def max_concurrent_trials(train_values: Mapping[str, Any], gpus_per_trial: int) -> int:
    """Trials that fit the connected cluster at once: CPUs / (workers × cpus per worker), and
    GPUs / gpus per trial (the trial driver itself takes no CPU)."""

    total = ray.cluster_resources()
    workers = int(train_values.get("num_workers", 1))
    cpus = workers * int(train_values.get("cpus_per_worker", 1))
    n = int(total.get("CPU", 0) // max(cpus, 1))
    if gpus_per_trial > 0:
        if total.get("GPU", 0) < gpus_per_trial:
            raise PmvisError(f"--gpus-per-trial {gpus_per_trial}: the Ray cluster has {total.get('GPU', 0):g} GPUs "
                             "(a trial would wait forever)")
        n = min(n, int(total.get("GPU", 0) // gpus_per_trial))
    if n < 1:
        raise PmvisError(f"a trial needs {cpus} CPUs ({workers} workers); the Ray cluster has {total.get('CPU', 0):g}")
    return n


def _resolve_raw(raw: str) -> str:
    return str(Path(resolve_raw_dir(raw)).resolve())


@dataclass
class SweepPlan:
    """A sweep's checked inputs (:func:`prepare_sweep`), ready for :func:`run_sweep`."""

    space: Any
    train_values: dict[str, Any]
    storage: str
    sweep_dir: Path
    tracking_uri: str
    ctx: dict[str, Any]  # what every trial driver gets


def prepare_sweep(cfg: SweepConfig) -> SweepPlan:
    """Every check of a sweep that needs no Ray (flags, search space, train config, dataset, raw
    store, one sampled trial's configs). Call it before connecting: bad input then fails in a
    second instead of after a Ray start-up."""

    if cfg.samples < 1:
        raise PmvisError(f"--samples must be ≥ 1, got {cfg.samples}")
    if cfg.filter not in ("auto", "on", "off"):
        raise PmvisError(f"filter must be auto, on or off, got {cfg.filter!r}")
    if cfg.trial_retries < 0:
        raise PmvisError(f"--trial-retries must be ≥ 0, got {cfg.trial_retries}")
    if cfg.gpus_per_trial < 0:
        raise PmvisError(f"--gpus-per-trial must be ≥ 0, got {cfg.gpus_per_trial}")
    if cfg.max_concurrent is not None and cfg.max_concurrent < 1:
        raise PmvisError(f"--max-concurrent must be ≥ 1, got {cfg.max_concurrent}")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise PmvisError(f"--name must be a plain directory name, got {cfg.name!r}")
    space = load_space(cfg.space)
    if not space.knobs:
        raise PmvisError(f"{space.source}: the search space has no knobs")
    check_search(space, cfg.search)
    if cfg.scheduler not in SCHEDULERS:
        raise PmvisError(f"unknown scheduler {cfg.scheduler!r} ({', '.join(SCHEDULERS)})")
    train_values = base_train_values(cfg)
    dataset = load_dataset_dir(cfg.data_dir)  # fail now on a bad dataset dir
    storage = str(Path(cfg.storage_path).expanduser().resolve())
    sweep_dir = Path(storage) / cfg.name
    tracking_uri = cfg.tracking_uri or default_tracking_uri()
    filter_on = cfg.filter == "on" or (cfg.filter == "auto" and "filter" in space.roots)
    ctx = {
        "name": cfg.name, "sweep_dir": str(sweep_dir), "data_dir": train_values["data"]["data_dir"],
        "raw_dir": _resolve_raw(cfg.pseudo_masks), "eval_annotations": str(Path(dataset.path).resolve()),
        "knob_paths": list(space.knobs), "train_values": train_values, "tracking_uri": tracking_uri,
        "fuse_overrides": cfg.fuse_overrides, "filter_overrides": cfg.filter_overrides, "filter_on": filter_on,
    }
    # Check the configs of one draw before any trial starts (a bad --set fails here, not in Ray).
    trial_configs(space.sample(0), ctx)
    return SweepPlan(space=space, train_values=train_values, storage=storage, sweep_dir=sweep_dir,
                     tracking_uri=tracking_uri, ctx=ctx)


def run_sweep(cfg: SweepConfig, plan: SweepPlan | None = None) -> SweepResult:
    """Run (or resume: the same name and storage path) a sweep on the connected Ray cluster.

    ``plan``: from :func:`prepare_sweep` (made here when not given)."""

    if plan is None:
        plan = prepare_sweep(cfg)
    space, train_values, storage, sweep_dir = plan.space, plan.train_values, plan.storage, plan.sweep_dir
    tracking_uri, ctx = plan.tracking_uri, plan.ctx
    if not ray.is_initialized():
        raise PmvisError("run_sweep needs a connected Ray cluster (pmvis.platform.cluster.connect)")
    concurrent = cfg.max_concurrent or max_concurrent_trials(train_values, cfg.gpus_per_trial)
    # The driver function only fuses and waits on its TorchTrainer: no CPU of its own (Tune needs
    # some resource in a trial's request, hence a token byte of memory); the workers hold the CPUs.
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), {"cpu": 0, "memory": 1})

    restored = tune.Tuner.can_restore(str(sweep_dir))
    if restored:
        logger.info("resuming sweep %s from %s", cfg.name, sweep_dir)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=True)
    else:
        ensure_experiment(cfg.name, tracking_uri)  # our artifact root, not ./mlruns
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space, cfg.search),
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=cfg.samples,
                                        search_alg=build_search_alg(space, cfg.search, cfg.seed, concurrent),
                                        scheduler=build_scheduler(cfg.scheduler, train_values)),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=storage,
                verbose=TUNE_VERBOSITY,
                failure_config=tune.FailureConfig(max_failures=cfg.trial_retries),
                callbacks=[ResumableMLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=cfg.name,
                                                save_artifact=False)]),
        )
    grid = tuner.fit()
    budget = int(train_values.get("iterations", TrainConfig.model_fields["iterations"].default))
    rows = collect_rows(grid, list(space.knobs), budget)
    for row in rows:
        d = sweep_dir / TRIALS_DIRNAME / row.trial_id
        row.trial_dir = str(d) if d.is_dir() else None
    # A trial ASHA stopped is killed with its training, which never closes its MLflow run; errored
    # trials keep theirs open (a rerun of the sweep resumes them into the same run).
    ended = {str(Path(r.trial_dir) / TRAIN_RUN_NAME) for r in rows if r.status != "error" and r.trial_dir}
    close_running_runs(f"{cfg.name}-train", tracking_uri, ended, "sweep scheduler")
    # Best: the first trial that ended without an error (rows rank full-budget trials before
    # early-stopped ones); a failed trial's partial AP does not count (rerun the sweep to resume it).
    best = next((r for r in rows if r.ap is not None and r.trial_dir and r.status != "error"), None)
    best_config = best_trial = None
    if best is not None:
        best_config, best_trial = write_best(sweep_dir, best, ctx)
    results_path = sweep_dir / RESULTS_FILENAME
    write_json_atomic(results_path, {"name": cfg.name, "space": space.source, "metric": METRIC, "mode": MODE,
                                     "trials": [r.__dict__ for r in rows]}, indent=1)
    return SweepResult(name=cfg.name, sweep_dir=str(sweep_dir), restored=restored, max_concurrent=concurrent,
                       rows=rows, best=best, best_config_path=best_config, best_trial_path=best_trial,
                       results_path=str(results_path), tracking_uri=tracking_uri, experiment=cfg.name)
