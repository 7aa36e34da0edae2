"""A sweep's outcome: one row per trial (status, knobs, AP), how trials rank, the table, the best
trial's config files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from pmvis.core.config import load_config
from pmvis.core.io import write_text_atomic
from pmvis.core.tables import format_table
from pmvis.platform.train.config import TrainConfig
from pmvis.platform.train.driver import CONFIG_FILENAME
from pmvis.platform.tune.config import BEST_CONFIG_FILENAME, BEST_TRIAL_FILENAME, METRIC, TRAIN_RUN_NAME, TRIALS_DIRNAME


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


STATUS_ORDER = ("done", "stopped", "error")  # how trials rank: full budget, then early-stopped, then failed


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _error_file(result: Any) -> str | None:
    path = Path(result.path) / "error.txt" if result.error is not None and result.path else None
    return str(path) if path is not None and path.is_file() else None


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


def format_trials(rows: list[TrialRow]) -> str:
    """The trials as a text table: id, knobs, eval_AP, iterations trained, status."""
    if not rows:
        return "no trials"
    paths = list(rows[0].knobs)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[r.trial_id, *(fmt(r.knobs.get(p)) for p in paths), "-" if r.ap is None else f"{r.ap:.3f}",
              fmt(r.iteration) if r.iteration is not None else "-", r.status] for r in rows]
    return format_table(["trial", *paths, METRIC, "iter", "status"], cells)


def write_best(sweep_dir: Path, best: TrialRow, ctx: Mapping[str, Any]) -> tuple[str, str]:
    """``best_config.yaml`` (a TrainConfig for `pmvis train --config`) and ``best_trial.yaml``."""

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


def format_sweep_result(result: SweepResult) -> str:
    """What a finished sweep prints: every trial (best first), failures, the best trial's files."""
    lines = [f"pmvis sweep {result.name}: {len(result.rows)} trials"
             + (" (resumed)" if result.restored else "") + f", up to {result.max_concurrent} at once",
             format_trials(result.rows)]
    lines += [f"  {r.failure_line()}" for r in result.rows if r.error]
    if result.best is not None:
        lines.append(f"best trial:  {result.best.trial_id} (eval_AP {result.best.ap:.3f})")
        lines.append(f"best config: {result.best_config_path} (pmvis train --config ...)")
        lines.append(f"best knobs:  {result.best_trial_path}")
    else:
        lines.append("best trial:  none (no trial reported eval_AP)")
    lines.append(f"results:     {result.results_path}")
    lines.append(f"MLflow:      experiment {result.experiment} ({result.tracking_uri})")
    return "\n".join(lines)
