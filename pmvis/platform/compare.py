"""Compare the MLflow runs of one experiment: best first, only the params that differ.

:func:`compare_runs` fetches the runs (``mlflow.search_runs``) and orders them by one metric
(``mode="max"``: highest first; runs without the metric go last). Params with the same value in
every run are left out of the table (a param missing from some runs counts as differing), so a
sweep's table shows exactly its knobs. :func:`write_comparison` writes ``compare.csv`` (every
metric, MLflow's ``params.``/``metrics.`` column names) and ``compare.png`` (the metric against
each differing param, one panel per param, the best run starred), both atomically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pmvis.core.errors import PmvisError
from pmvis.core.io import atomic_path
from pmvis.core.tables import format_table
from pmvis.platform.experiments import resolve_tracking_uri, search_runs

PARAM_PREFIX = "params."
METRIC_PREFIX = "metrics."
EVAL_PREFIX = "eval_"  # held-out metrics of training runs (pmvis.platform.train)
RUN_NAME_TAG = "tags.mlflow.runName"
CSV_NAME = "compare.csv"
PNG_NAME = "compare.png"
MAX_PANELS = 16  # params plotted (the rest stay in the CSV)
MAX_PRINTED_METRICS = 8  # other metrics printed beside the compared one (all are in the CSV)
MAX_CELL = 28  # printed cell width


@dataclass
class Comparison:
    """The runs of ``experiment`` ordered best first by ``metric``.

    ``table`` columns: ``rank, run_name, run_id, status, metrics.<metric>, params.<varying>...,
    metrics.<other>...``.
    """

    experiment: str
    metric: str
    mode: str
    tracking_uri: str
    table: Any  # pandas.DataFrame
    varying_params: list[str] = field(default_factory=list)  # without the "params." prefix
    constant_params: dict[str, str] = field(default_factory=dict)
    other_metrics: list[str] = field(default_factory=list)

    @property
    def metric_column(self) -> str:
        return METRIC_PREFIX + self.metric

    @property
    def best(self) -> dict[str, Any]:
        return self.table.iloc[0].to_dict()


def _differs(series) -> bool:
    return series.astype(object).where(series.notna(), None).map(repr).nunique() > 1


def _resolve_metric(runs: Any, metric: str) -> str | None:
    """``metric`` if some run logged it, else its held-out form ``eval_<metric>`` (pmvis training
    and sweep runs log the held-out AP as ``eval_AP``, so ``--metric AP`` finds them); else None."""
    for name in (metric, EVAL_PREFIX + metric):
        col = METRIC_PREFIX + name
        if col in runs.columns and not runs[col].isna().all():
            return name
    return None


def compare_runs(experiment: str, *, metric: str = "AP", mode: str = "max",
                 tracking_uri: str | None = None) -> Comparison:
    """Fetch the runs of ``experiment`` and order them best first by ``metric``."""

    if mode not in ("max", "min"):
        raise PmvisError(f"mode must be 'max' or 'min', got {mode!r}")
    uri = resolve_tracking_uri(tracking_uri)
    metric_arg = metric
    runs = search_runs(experiment, uri)
    if runs is None or len(runs) == 0:
        raise PmvisError(f"experiment {experiment!r} in {uri} has no runs")
    metric_cols = sorted(c for c in runs.columns if c.startswith(METRIC_PREFIX))
    metric = _resolve_metric(runs, metric)
    if metric is None:
        known = ", ".join(c[len(METRIC_PREFIX):] for c in metric_cols) or "none"
        raise PmvisError(f"no run of experiment {experiment!r} has metric {metric_arg!r} (metrics logged: {known})")
    metric_col = METRIC_PREFIX + metric

    order = runs.sort_values(by=[metric_col, "start_time"], ascending=[mode == "min", True],
                             na_position="last", kind="stable").reset_index(drop=True)
    param_cols = sorted(c for c in order.columns if c.startswith(PARAM_PREFIX))
    varying = [c for c in param_cols if _differs(order[c])]
    constant = {c[len(PARAM_PREFIX):]: order[c].iloc[0] for c in param_cols if c not in varying}
    others = [c for c in metric_cols if c != metric_col]

    names = order[RUN_NAME_TAG] if RUN_NAME_TAG in order.columns else pd.Series([None] * len(order))
    table = pd.DataFrame({
        "rank": range(1, len(order) + 1),
        "run_name": names.fillna("").astype(str).values,
        "run_id": order["run_id"].values,
        "status": order["status"].values if "status" in order.columns else "",
    })
    table[metric_col] = order[metric_col].values
    for c in varying + others:
        table[c] = order[c].values
    return Comparison(experiment=experiment, metric=metric, mode=mode, tracking_uri=uri, table=table,
                      varying_params=[c[len(PARAM_PREFIX):] for c in varying], constant_params=constant,
                      other_metrics=[c[len(METRIC_PREFIX):] for c in others])


# ----------------------------------------------------------------------------- text table


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 1] + "…"


def format_comparison(c: Comparison) -> str:
    """The table as text: rank, run, metric, differing params, the first few other metrics."""
    t = c.table
    shown_metrics = c.other_metrics[:MAX_PRINTED_METRICS]
    headers = ["#", "run", "run_id", c.metric] + c.varying_params + shown_metrics
    cols = ["rank", "run_name", "run_id", c.metric_column] + [PARAM_PREFIX + p for p in c.varying_params] \
        + [METRIC_PREFIX + m for m in shown_metrics]
    rows = [[_cell(r[col])[:8] if col == "run_id" else _cell(r[col]) for col in cols]
            for r in t.to_dict("records")]
    lines = [f"experiment {c.experiment!r}: {len(t)} runs, best {c.mode} {c.metric} first ({c.tracking_uri})",
             format_table(headers, rows, align="rl" + "r" * (len(headers) - 2))]
    notes = []
    if c.constant_params:
        notes.append(f"{len(c.constant_params)} params equal in every run (omitted)")
    if not c.varying_params:
        notes.append("no param differs between the runs")
    if len(c.other_metrics) > len(shown_metrics):
        notes.append(f"{len(c.other_metrics) - len(shown_metrics)} more metrics in {CSV_NAME}")
    if notes:
        lines.append("; ".join(notes))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def _numeric(series):
    """The series as floats if every non-null value is a number (booleans stay categorical)."""

    values = series.dropna().astype(str)
    if values.empty or values.str.lower().isin(["true", "false"]).any():
        return None
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        return None
    return pd.to_numeric(series.astype(object).where(series.notna(), None), errors="coerce")


def plot_comparison(c: Comparison, path: str | os.PathLike) -> None:
    """``path`` (PNG, atomic): the metric against each differing param, best run starred."""

    t = c.table
    y = t[c.metric_column].astype(float)
    params = c.varying_params[:MAX_PANELS]
    n = max(len(params), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    best = y.notna() & (t["rank"] == t.loc[y.notna(), "rank"].min())
    if not params:
        ax = axes[0]
        ax.bar(t["rank"].astype(str), y.fillna(0.0), color="tab:blue")
        ax.set_xlabel("run rank")
        ax.set_ylabel(c.metric)
    for ax, p in zip(axes, params):
        col = t[PARAM_PREFIX + p]
        x = _numeric(col)
        if x is None:  # categorical: one column per value, in sorted order
            labels = sorted(col.fillna("-").astype(str).unique())
            x = col.fillna("-").astype(str).map({v: i for i, v in enumerate(labels)}).astype(float)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ok = x.notna() & y.notna()
        ax.scatter(x[ok], y[ok], s=22, color="tab:blue", alpha=0.8)
        ax.scatter(x[ok & best], y[ok & best], s=120, marker="*", color="tab:red", label="best")
        ax.set_xlabel(p, fontsize=8)
        ax.set_ylabel(c.metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(params) if params else 1:]:
        ax.set_visible(False)
    fig.suptitle(f"{c.experiment}: {c.metric} ({c.mode}) vs differing params, {len(t)} runs", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_comparison(c: Comparison, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``out_dir/compare.csv`` and ``out_dir/compare.png`` atomically; return their paths."""
    out = Path(out_dir)
    csv_path, png_path = out / CSV_NAME, out / PNG_NAME
    with atomic_path(csv_path) as tmp:
        c.table.to_csv(tmp, index=False)
    plot_comparison(c, png_path)
    return {"csv": csv_path, "png": png_path}
