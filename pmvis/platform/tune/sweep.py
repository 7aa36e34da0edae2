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
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ray.air.integrations.mlflow import MLflowLoggerCallback

from pmvis.core.errors import PmvisError

logger = logging.getLogger(__name__)

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


@dataclass
class SweepConfig:
    """Everything :func:`run_sweep` needs (the CLI builds it from its flags)."""

    space: str  # packaged space name or YAML file
    data_dir: str
    raw: str  # `pmvis pseudo-masks` output dir (OUT, reads OUT/raw) or the store itself
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


@dataclass
class TrialRow:
    trial_id: str
    status: str
    knobs: dict[str, Any]
    ap: float | None
    iteration: int | None
    trial_dir: str | None
    error: str | None = None  # the last line of the trial's exception
    error_file: str | None = None  # Tune's full traceback of a failed trial

    def failure_line(self) -> str | None:
        """"trial ID failed: ERROR (traceback: FILE)" for a failed trial, else None."""
        if not self.error:
            return None
        return f"trial {self.trial_id} failed: {self.error}" + (
            f" (traceback: {self.error_file})" if self.error_file else "")


@dataclass
class SweepResult:
    name: str
    sweep_dir: str
    restored: bool
    max_concurrent: int
    rows: list[TrialRow]  # best first (no AP last)
    best: TrialRow | None
    best_config_path: str | None
    best_trial_path: str | None
    results_path: str
    tracking_uri: str
    experiment: str


# ----------------------------------------------------------------------------- configs


# Tune's console output: status tables only (3, its default, also prints every trial's full
# result table at every report: dozens of loss terms that MLflow and `pmvis compare` show better).
TUNE_VERBOSITY = 1


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
    from pmvis.core.config import build_config
    from pmvis.platform.train.config import TrainConfig
    from pmvis.core.config import merge_values

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
    from pmvis.platform.pseudo.filters import FilterConfig
    from pmvis.models.fusion import FuseConfig
    from pmvis.core.config import build_config
    from pmvis.core.config import apply_dotted
    from pmvis.platform.tune.search_spaces import base_config
    from pmvis.core.config import merge_values

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
    from pmvis.core.io import write_json_atomic
    from pmvis.platform.pseudo.refine import refine
    from pmvis.platform.data.ytvis import load_dataset_dir, save_ytvis

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
    from pmvis.core.config import build_config
    from pmvis.platform.train.config import TrainConfig

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
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pmvis.core.config import dump_config
    from pmvis.core.io import write_text_atomic
    from pmvis.platform.train.driver import run_training

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


# ----------------------------------------------------------------------------- Tune setup


class ResumableMLflowLoggerCallback(MLflowLoggerCallback):
    """Ray's MLflow logger, but a trial resumed by ``Tuner.restore`` keeps its MLflow run.

    Ray keys its trial → run map by Trial objects, which a restore recreates, so a resumed trial
    would open a second run. This callback saves the map by trial id in the experiment state
    (Tune's ``get_state``/``set_state``) and logs a resumed trial into its first run.
    """

    def setup(self, *args: Any, **kwargs: Any) -> None:
        super().setup(*args, **kwargs)
        self._run_ids: dict[str, str] = getattr(self, "_run_ids", {})

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs and trial.trial_id in self._run_ids:
            self._trial_runs[trial] = self._run_ids[trial.trial_id]
            from mlflow.tracking import MlflowClient

            MlflowClient(self.tracking_uri).update_run(self._run_ids[trial.trial_id], status="RUNNING")
        super().log_trial_start(trial)
        self._run_ids[trial.trial_id] = self._trial_runs[trial]

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        # Tune puts the trial config into the result (logged flat as config/<knob>): those are the
        # run's params already, not metrics.
        super().log_trial_result(iteration, trial, {k: v for k, v in result.items()
                                                    if k != "config" and not k.startswith("config/")})

    def get_state(self) -> dict | None:
        run_ids = getattr(self, "_run_ids", {})
        return {"run_ids": dict(run_ids)} if run_ids else None

    def set_state(self, state: dict) -> None:
        self._run_ids = dict(state.get("run_ids") or {})



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
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(metric=METRIC, mode=MODE, seed=seed), max_concurrent=max_concurrent)


def build_scheduler(scheduler: str, train_values: Mapping[str, Any]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if scheduler == "fifo":
        return FIFOScheduler()
    if scheduler != "asha":
        raise PmvisError(f"unknown scheduler {scheduler!r} ({', '.join(SCHEDULERS)})")
    from pmvis.core.config import build_config
    from pmvis.platform.train.config import TrainConfig

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
    import ray

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
    from pmvis.platform.pseudo.store import resolve_raw_dir

    return str(Path(resolve_raw_dir(raw)).resolve())


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _error_file(result: Any) -> str | None:
    path = Path(result.path) / "error.txt" if result.error is not None and result.path else None
    return str(path) if path is not None and path.is_file() else None


STATUS_ORDER = ("done", "stopped", "error")  # how trials rank: full budget, then early-stopped, then failed


def collect_rows(grid: Any, knob_paths: list[str], iterations: int) -> list[TrialRow]:
    """One row per trial: ``done`` (trained its ``iterations``), ``stopped`` (ended early without an
    error: the scheduler stopped it, its AP is from fewer iterations) or ``error``. Ranked by status
    first, then AP: an AP after half the budget does not compete with one after the whole budget."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        cfg = r.config or {}
        trial_id = m.get("trial_id") or (Path(r.path).name if r.path else "?")
        iteration = m.get("iteration")
        status = "error" if r.error else (
            "stopped" if isinstance(iteration, int) and iteration < iterations else "done")
        rows.append(TrialRow(
            trial_id=str(trial_id), status=status,
            knobs={p: cfg.get(p) for p in knob_paths}, ap=_float(m.get(METRIC)),
            iteration=iteration, trial_dir=None,
            error=None if r.error is None else str(r.error).strip().splitlines()[-1][:300],
            error_file=_error_file(r)))
    rows.sort(key=lambda row: (STATUS_ORDER.index(row.status), row.ap is None, -(row.ap or 0.0)))
    return rows


def format_table(rows: list[TrialRow]) -> str:
    if not rows:
        return "no trials"
    paths = list(rows[0].knobs)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [["trial", *paths, METRIC, "iter", "status"]]
    for r in rows:
        table.append([r.trial_id, *(fmt(r.knobs.get(p)) for p in paths),
                      "-" if r.ap is None else f"{r.ap:.3f}", fmt(r.iteration) if r.iteration is not None else "-",
                      r.status])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def close_stopped_trainer_runs(rows: list[TrialRow], tracking_uri: str, experiment: str) -> list[str]:
    """Mark KILLED the trainer MLflow runs that ended trials left RUNNING: a trial stopped early by
    ASHA is killed with its training, which never closes its run. Errored trials are left as they
    are (a rerun of the sweep resumes them into the same run). Returns the run ids closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    ended = {str(Path(r.trial_dir) / TRAIN_RUN_NAME) for r in rows if r.status != "error" and r.trial_dir}
    if exp is None or not ended:
        return []
    closed = []
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=10000):
        if run.data.tags.get("pmvis.run_dir") in ended:
            client.set_tag(run.info.run_id, "pmvis.stopped_by", "sweep scheduler")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def write_best(sweep_dir: Path, best: TrialRow, ctx: Mapping[str, Any]) -> tuple[str, str]:
    """``best_config.yaml`` (a TrainConfig for `pmvis train --config`) and ``best_trial.yaml``."""
    import yaml

    from pmvis.core.config import load_config
    from pmvis.core.io import write_text_atomic
    from pmvis.platform.train.driver import CONFIG_FILENAME
    from pmvis.platform.train.config import TrainConfig

    trial_dir = sweep_dir / TRIALS_DIRNAME / best.trial_id
    cfg = load_config(TrainConfig, trial_dir / TRAIN_RUN_NAME / CONFIG_FILENAME)
    # A fresh run (not the trial's own, which would only resume) next to the sweep.
    cfg = cfg.model_copy(update={"run_name": None, "storage_path": str(sweep_dir.parent)})
    header = [f"# Best trial {best.trial_id} of sweep {ctx['name']} ({METRIC} {best.ap}); its knobs:"]
    header += [f"#   {p}: {v}" for p, v in best.knobs.items()]
    config_path = sweep_dir / BEST_CONFIG_FILENAME
    write_text_atomic(config_path, "\n".join(header) + "\n"
                      + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    info: dict[str, Any] = {"trial_id": best.trial_id, METRIC: best.ap, "iteration": best.iteration,
                            "knobs": best.knobs, "trial_dir": str(trial_dir),
                            "train_config": str(config_path)}
    for key in ("fuse_config", "filter_config"):
        p = trial_dir / f"{key}.yaml"
        if p.is_file():
            info[key] = yaml.safe_load(p.read_text())
    trial_path = sweep_dir / BEST_TRIAL_FILENAME
    write_text_atomic(trial_path, yaml.safe_dump(info, sort_keys=False))
    return str(config_path), str(trial_path)


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
    from pmvis.platform.tune.search_spaces import load_space
    from pmvis.platform.experiments import default_tracking_uri
    from pmvis.platform.data.ytvis import load_dataset_dir

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
        "raw_dir": _resolve_raw(cfg.raw), "eval_annotations": str(Path(dataset.path).resolve()),
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
    import ray
    from ray import tune

    from pmvis.core.io import write_json_atomic
    from pmvis.platform.experiments import ensure_experiment
    from pmvis.platform.train.config import TrainConfig

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
    close_stopped_trainer_runs(rows, tracking_uri, f"{cfg.name}-train")
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
