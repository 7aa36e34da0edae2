"""Compare the MLflow runs of an experiment: best first, the params that differ, CSV and PNG.

Prints one row per run ordered by --metric (highest first with --mode max), with the params that
differ between runs (params equal in every run are omitted) and the metrics; writes
DIR/compare.csv (all metrics) and DIR/compare.png (the metric against each differing param).
Runs are read from --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db. Browse the
same store with: mlflow ui --backend-store-uri sqlite:///ABS/PATH/mlflow.db
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--metric", default="AP", help="metric to order by (default AP)")
    parser.add_argument("--mode", choices=("max", "min"), default="max",
                        help="max: highest metric first (default); min: lowest first")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI or a path to an mlflow.db (default: MLFLOW_TRACKING_URI, "
                             "else ./mlflow/mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("pmvis-compare"), metavar="DIR",
                        help="where compare.csv and compare.png go (default ./pmvis-compare)")


def run(args: argparse.Namespace) -> int:
    from pmvis.platform.compare import compare_runs, format_comparison, write_comparison

    comparison = compare_runs(args.experiment, metric=args.metric, mode=args.mode,
                              tracking_uri=args.tracking_uri)
    print(format_comparison(comparison))
    paths = write_comparison(comparison, args.out)
    print(f"written: {paths['csv']}, {paths['png']}")
    return 0
