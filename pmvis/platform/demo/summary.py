"""The demo's closing tables and summary (also OUT/comparison.md and OUT/summary.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pmvis.core.tables import format_table


def summary_text(out: Path, table: str, sweep: Any, comparison: Any, report: dict, tracking_uri: str,
                 seconds: float) -> str:
    """The closing summary (also OUT/summary.md): AP table, sweep result, plots, MLflow."""
    lines = [f"# pmvis demo summary ({seconds / 60:.1f} min)", "",
             "Held-out AP against the true masks (tiny model; on the demo's 8 held-out videos AP moves by "
             "several points between neighbouring checkpoints of one run, see benchmarks/README.md):", "",
             table, ""]
    if sweep is not None:
        lines += [f"Sweep {sweep.name}: {len(sweep.rows)} trials (best first by eval_AP; trials ASHA stopped "
                  "early, status 'stopped', rank after those that trained the whole budget):", "",
                  sweep_table(sweep), ""]
        failed = [r.failure_line() for r in sweep.rows if r.error]
        lines += failed + ([""] if failed else [])
        if sweep.best_config_path:
            lines.append(f"best config: {sweep.best_config_path}  (pmvis train --config ...)")
    plots = [str(out / "report" / p) for p in report["plots"]]
    if comparison is not None:
        plots.append(str(out / "compare" / "compare.png"))
    lines += ["plots:"] + [f"  {p}" for p in plots]
    lines += [f"comparison: {out / 'comparison.md'}",
              f"MLflow:     mlflow ui --backend-store-uri {tracking_uri}",
              f"outputs:    {out}"]
    return "\n".join(lines)


def sweep_table(sweep: Any) -> str:
    """The sweep's trials as a Markdown table (knobs, eval_AP, iterations trained, status)."""
    knobs = list(sweep.rows[0].knobs) if sweep.rows else []
    rows = []
    for r in sweep.rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.knobs.get(k) for k in knobs)]
        rows.append([r.trial_id, *cells, "-" if r.ap is None else f"{r.ap:.2f}", str(r.iteration or "-"), r.status])
    return format_table(["trial", *knobs, "eval_AP", "iterations", "status"], rows, style="markdown")


def comparison_table(rows: dict[str, Any]) -> str:
    """Held-out AP/AR of each training run (against the true masks) as a Markdown table."""
    names = ("AP", "AP50", "AP75", "AR1", "AR10")
    cells = []
    for label, result in rows.items():
        ev = result.evaluation or {}
        cells.append([label, *("-" if ev.get(n) is None else f"{ev[n]:.1f}" for n in names)])
    return format_table(["model", *names], cells, style="markdown")
