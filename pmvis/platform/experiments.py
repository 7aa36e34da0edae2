"""MLflow tracking: one place that decides where runs go and how a config becomes params.

Locally runs go to a sqlite store (MLflow 3.13+ refuses the ./mlruns file store) with artifacts
on files beside it; on a cluster set MLFLOW_TRACKING_URI (or --tracking-uri) to the MLflow
server the head node runs.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

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
    import mlflow
    from mlflow.exceptions import MlflowException

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
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    experiment_id = ensure_experiment(experiment, uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run
