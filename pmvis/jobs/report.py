"""Report pseudo-mask quality per source and fused, filter precision/recall, plots, MLflow run.

Reads only OUT/raw (never re-runs the models). With the truth (DIR/truth.json by default when
present, or --truth) it measures mean spatio-temporal IoU and the share above 0.5/0.75 IoU per
source, for the fused masks and for the filled-box baseline; with DIR/defects.json it scores the
RIA and Missing-Data filters. Writes REPORT_DIR/report.json, PNG plots, and logs everything
(params = every knob, metrics, artifacts) to one MLflow run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmvis.jobs import add_pseudo_masks_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset dir")
    add_pseudo_masks_argument(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="where report.json and plots go")
    parser.add_argument("--truth", type=Path, help="true masks (default DIR/truth.json when it exists)")
    parser.add_argument("--annotations", help="annotation file inside DIR (default annotations.json)")
    parser.add_argument("--config", type=Path, metavar="REPORT.yaml", help="YAML of ReportConfig knobs (filter, fuse)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI or sqlite ./mlflow)")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.config import load_config
    from pmvis.platform.report import ReportConfig, build_report, format_report

    config = load_config(ReportConfig, args.config)
    result = build_report(args.data, args.pseudo_masks, args.out, config, truth=args.truth, annotations=args.annotations,
                          tracking_uri=args.tracking_uri)
    print(format_report(result))
    print(f"report in {args.out} (plots: {', '.join(result['plots'])}); MLflow run {result['mlflow_run_id']}")
    return 0
