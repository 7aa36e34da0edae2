"""MLflow, in one module: where runs go, how a config becomes params, the training run's record.

Locally runs go to a sqlite store (MLflow 3.13+ refuses the ./mlruns file store) with artifacts
on files beside it; on a cluster set MLFLOW_TRACKING_URI (or --tracking-uri) to the MLflow
server the head node runs.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

from pmvis.core.errors import PmvisError

logger = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlflow")  # relative to the working directory unless configured
DB_NAME = "mlflow.db"
ARTIFACTS_DIRNAME = "artifacts"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def default_tracking_uri(store_dir: str | os.PathLike | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store under ``store_dir`` (default ./mlflow)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(store_dir or DEFAULT_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / DB_NAME}"


def _artifact_root(tracking_uri: str) -> str | None:
    """For a local sqlite store keep artifacts next to the database, not in the CWD."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / ARTIFACTS_DIRNAME).as_uri()
    return None


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict → {"a.b.c": "value"} as MLflow params (every knob, defaults included)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The experiment's id, created (artifacts beside a sqlite store) if missing.

    Concurrent sweep trials start their trainings together and may both find the experiment
    missing: the loser of the create race takes the winner's experiment instead of failing.
    """

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_root(tracking_uri))
    except MlflowException as exc:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        logger.debug("experiment %s was created concurrently (%s)", name, exc)
        return experiment.experiment_id


@contextmanager
def mlflow_run(
    experiment: str,
    *,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Start a run in ``experiment`` with ``params`` (nested dicts are flattened) logged up front."""
    uri = tracking_uri or default_tracking_uri()
    experiment_id = ensure_experiment(experiment, uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run


def log_outputs(metrics: Mapping[str, float], artifacts_dir: str | os.PathLike | None = None) -> None:
    """Metrics and every file under ``artifacts_dir`` into the active run (:func:`mlflow_run`)."""
    mlflow.log_metrics(dict(metrics))
    if artifacts_dir is not None:
        mlflow.log_artifacts(str(artifacts_dir))


def log_artifact(tracking_uri: str, run_id: str, path: str | os.PathLike) -> None:
    MlflowClient(tracking_uri).log_artifact(run_id, str(path))


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close a run the driver opened (``status``: FINISHED, FAILED or KILLED)."""
    MlflowClient(tracking_uri).set_terminated(run_id, status=RunStatus.to_string(getattr(RunStatus, status)))


class MetricsLogger:
    """Metrics from rank 0 into the run the driver opened (a no-op without a run id)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.client is None:
            return

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None]
        for i in range(0, len(items), 500):
            try:
                self.client.log_batch(self.run_id, metrics=items[i:i + 500])
            except Exception as e:  # tracking must never kill a training run
                logger.warning("MLflow logging failed at iteration %d: %s", step, e)
                return

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            try:
                self.client.set_tag(self.run_id, key, value)
            except Exception as e:
                logger.warning("MLflow tag failed: %s", e)


def open_run(cfg: Any, run_dir: str, resume_meta: Mapping[str, Any] | None) -> str:
    """The MLflow run of a training run (its config as params): on resume the checkpoint's run,
    re-opened, with the params that changed noted in a tag; else a new run."""

    uri = cfg.tracking_uri
    client = MlflowClient(uri)
    params = flatten_params(cfg.model_dump(mode="json"))
    run_id = None
    if resume_meta and resume_meta.get("mlflow_run_id") and resume_meta.get("tracking_uri") == uri:
        try:
            run = client.get_run(resume_meta["mlflow_run_id"])
            run_id = run.info.run_id
        except MlflowException:
            logger.warning("MLflow run %s of the checkpoint is gone: starting a new one", resume_meta["mlflow_run_id"])
    if run_id is not None:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        logged = run.data.params
        new = {k: v for k, v in params.items() if k not in logged}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            client.set_tag(run_id, "pmvis.resume_changed_params", ", ".join(changed)[:5000])
        params = new
        client.set_tag(run_id, "pmvis.resumed_at", str(resume_meta.get("iteration")))
    else:
        experiment_id = ensure_experiment(cfg.experiment, uri)
        run = client.create_run(experiment_id, run_name=cfg.run_name,
                                tags={"pmvis.command": "train", "pmvis.run_dir": run_dir})
        run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow: at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def retire_runs(tracking_uri: str, experiments: tuple[str, ...]) -> None:
    """Soft-delete the runs of the demo's own sweep experiments (MLflow keeps them restorable)."""

    client = MlflowClient(tracking_uri=tracking_uri)
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            continue
        for run in client.search_runs([exp.experiment_id], max_results=10000):
            client.delete_run(run.info.run_id)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else MLFLOW_TRACKING_URI, else ``./mlflow/mlflow.db``; a path to an existing file
    is read as a sqlite store. A sqlite store must exist (a read must not create an empty one)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_STORE_DIR / DB_NAME).resolve()}"
    if "://" not in uri and Path(uri).is_file():
        uri = f"sqlite:///{Path(uri).resolve()}"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise PmvisError(f"no MLflow store at {db} (tracking URI {uri}); pass --tracking-uri "
                             "or set MLFLOW_TRACKING_URI")
    return uri


def search_runs(experiment: str, tracking_uri: str) -> Any:
    """Every run of ``experiment`` as MLflow's pandas table (params.*, metrics.*, tags.* columns)."""
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise PmvisError(f"no experiment {experiment!r} in {tracking_uri} "
                             f"(experiments: {', '.join(names) or 'none'})")
        mlflow.set_tracking_uri(tracking_uri)
        return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")
    except MlflowException as e:
        raise PmvisError(f"cannot read runs of {experiment!r} from {tracking_uri}: {e.message}") from None


def close_running_runs(experiment: str, tracking_uri: str, run_dirs: set[str], reason: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment`` whose ``pmvis.run_dir`` tag is one of
    ``run_dirs`` (their process was killed before it could close them), tagging ``reason`` as
    ``pmvis.stopped_by``; returns the run ids closed."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or not run_dirs:
        return []
    closed = []
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=10000):
        if run.data.tags.get("pmvis.run_dir") in run_dirs:
            client.set_tag(run.info.run_id, "pmvis.stopped_by", reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


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
