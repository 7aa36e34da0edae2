"""Score YouTube-VIS results (AP/AR, per-category AP) with the official evaluator's semantics.

Prints the table; with --out also writes {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
"AR10", "per_category_AP"} as percentages (null where the official evaluator gives -1).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, type=Path, help="ground-truth YTVIS annotation file")
    parser.add_argument("--results", required=True, type=Path, help="YTVIS results file (a JSON list)")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here (atomically)")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.io import write_json_atomic
    from pmvis.platform.data.results_io import load_results
    from pmvis.platform.data.ytvis_io import load_ytvis
    from pmvis.platform.evaluation import evaluate_ytvis, format_metrics_table

    gt = load_ytvis(args.gt)
    results = load_results(args.results, gt)
    result = evaluate_ytvis(gt, results)
    print(format_metrics_table(result, title=f"{args.results} vs {args.gt} ({len(results)} predictions)"))
    if args.out:
        write_json_atomic(args.out, result.to_json(), indent=2)
        print(f"metrics written to {args.out}")
    return 0
