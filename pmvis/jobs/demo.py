"""Run the embedded default end to end on a local Ray: data → box-only model → pseudo masks → PM-VIS.

1. a synthetic YouTube-VIS set under OUT/data (boxes, defective masks, true masks);
2. the "filled box as mask" baseline and the defective annotation masks scored against the truth;
3. a box-only IDOL-BoxInst model (tiny) trained with Ray Train — also the `boxinst` source;
4. pseudo masks from GrabCut, HQ-SAM (vit_tiny), a SAM 2 (tiny) tracker and the box-only model on
   Ray Data — HQ-SAM and SAM 2 with random weights unless checkpoints are given;
5. DOOB/SCM/SHQM fusion into training annotations and the RIA / Missing-Data filters;
6. PM-VIS (box-only losses + fused pseudo masks) and fully supervised models trained with the same
   budget, all three evaluated on the same held-out videos against the true masks;
7. a quality report (plots, filter precision/recall); everything logged to MLflow under OUT/mlflow.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("pmvis-demo"), metavar="DIR",
                        help="output directory (default ./pmvis-demo; its dataset is regenerated each run)")
    parser.add_argument("--seed", type=int, default=None, help="synthetic data seed (default 0)")
    parser.add_argument("--sources", default=",".join(DEMO_SOURCES),
                        help=f"pseudo-mask sources (default {','.join(DEMO_SOURCES)})")
    parser.add_argument("--hqsam-checkpoint", help="a real sam_hq_vit_tiny.pth (else random weights)")
    parser.add_argument("--sam2-checkpoint", help="a real sam2.1_hiera_tiny.pt (else random weights)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"training iterations per model (default {DEMO_ITERATIONS}; --tiny {TINY_ITERATIONS})")
    parser.add_argument("--tiny", action="store_true", help="a very small dataset and short training, for tests")


DEMO_SOURCES = ("grabcut", "hqsam", "track")
# The --tiny dataset: small enough for a test, big enough to have every kind of defect.
TINY_SYNTH = {"videos": 3, "frames": 4, "height": 64, "width": 80}
# The demo's default dataset: small enough for the random-weight models on 2 CPU cores.
DEMO_SYNTH = {"videos": 6, "frames": 8}
# Without a SAM 2 checkpoint the tracker's weights are random anyway: run it at a small input
# size so the demo stays fast (SAM 2 is trained at 1024; a real checkpoint keeps that).
RANDOM_SAM2_OVERRIDES = ("++model.image_size=256",)
# Training budget per model (the same for box-only, PM-VIS and fully supervised).
DEMO_ITERATIONS = 300
TINY_ITERATIONS = 6


def run(args: argparse.Namespace) -> int:
    import shutil

    from pmvis.models.box_baseline import annotations_as_results, filled_box_results
    from pmvis.models.filters import FilterConfig, filter_annotations
    from pmvis.models.fusion import fuse_annotations
    from pmvis.platform.cluster import connect
    from pmvis.platform.config import build_config
    from pmvis.platform.evaluation import evaluate_ytvis, format_metrics_table
    from pmvis.platform.io import write_json_atomic, write_text_atomic
    from pmvis.platform.pseudo_masks import PseudoMaskConfig, generate_pseudo_masks
    from pmvis.platform.raw_masks import read_raw
    from pmvis.platform.report import ReportConfig, build_report, format_report
    from pmvis.platform.synthetic import SynthConfig, generate_synthetic
    from pmvis.platform.tracking import default_tracking_uri
    from pmvis.platform.training import TrainConfig, run_training
    from pmvis.platform.ytvis import load_ytvis, save_results, save_ytvis
    from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME

    start = time.perf_counter()
    out: Path = args.out.resolve()
    values = dict(TINY_SYNTH if args.tiny else DEMO_SYNTH)
    if args.seed is not None:
        values["seed"] = args.seed
    synth_cfg = build_config(SynthConfig, values, source="demo")
    data_dir = out / "data"
    print(f"[1/7] synthetic dataset -> {data_dir}")
    summary = generate_synthetic(data_dir, synth_cfg, overwrite=True, progress=True)
    print(f"      {summary['videos']} videos, {summary['instances']} instances, {summary['masks']} masks, "
          f"defects {summary['defects']}")

    truth = load_ytvis(data_dir / "truth.json")
    annotations = load_ytvis(data_dir / "annotations.json", check_frames=True)
    print("[2/7] baselines scored against the true masks")
    for name, results in (("box_baseline", filled_box_results(annotations)),
                          ("annotation_masks", annotations_as_results(annotations))):
        save_results(results, out / f"results_{name}.json")
        metrics = evaluate_ytvis(truth, results)
        write_json_atomic(out / f"metrics_{name}.json", metrics.to_json(), indent=2)
        print(format_metrics_table(metrics, title=f"{name}"))

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    iterations = args.iterations or (TINY_ITERATIONS if args.tiny else DEMO_ITERATIONS)
    tracking_uri = default_tracking_uri(out / "mlflow")
    # Submitted as a Ray job (RAY_ADDRESS set): use that cluster; otherwise a fresh local Ray.
    connect("auto" if os.environ.get("RAY_ADDRESS") else "local")

    def train(name: str, mode: str, **data: Any) -> Any:
        cfg = TrainConfig.tiny(
            data_dir, iterations=iterations, run_name=name, storage_path=str(out / "runs"),
            experiment="pmvis-demo-train", tracking_uri=tracking_uri, checkpoint_every=max(iterations // 2, 1),
            lr_steps=[int(iterations * 0.8)], loss={"mode": mode},
            data={"eval_annotations": "truth.json", **data},
        )
        shutil.rmtree(out / "runs" / name, ignore_errors=True)  # the data changed: no stale resume
        return run_training(cfg)

    print(f"[3/7] box-only model (IDOL-BoxInst, tiny, {iterations} iterations) on Ray Train")
    box_only = train("box_only", "boxinst")

    options: dict = {"track": {"checkpoint": args.sam2_checkpoint} if args.sam2_checkpoint
                     else {"sam2_overrides": list(RANDOM_SAM2_OVERRIDES)},
                     "boxinst": {"checkpoint": str(Path(box_only.checkpoint) / CHECKPOINT_FILENAME),
                                 "inference": {"test_short_side": None, "test_max_size": None}}}
    if args.hqsam_checkpoint:
        options["hqsam"] = {"checkpoint": args.hqsam_checkpoint}
    sources = sources + (["boxinst"] if "boxinst" not in sources else [])
    pm_dir = out / "pseudo_masks"
    shutil.rmtree(pm_dir, ignore_errors=True)  # the dataset was regenerated: stored masks are stale
    print(f"[4/7] pseudo masks ({', '.join(sources)}) on Ray Data -> {pm_dir}")
    pm_cfg = build_config(PseudoMaskConfig, {"sources": sources, "source_options": options}, source="demo")
    generate_pseudo_masks(data_dir, pm_dir, pm_cfg)

    print("[5/7] fusion (DOOB, SCM, SHQM) and ground-truth filters (RIA, Missing-Data)")
    filter_cfg = FilterConfig()
    tracks = read_raw(pm_dir / "raw")
    fused = fuse_annotations(annotations, tracks, filter_cfg.fuse)
    save_ytvis(fused, out / "train_pseudo.json")
    cleaned, findings = filter_annotations(annotations, tracks, filter_cfg)
    save_ytvis(cleaned, out / "train_clean.json")
    write_json_atomic(out / "train_clean.report.json", findings, indent=2)
    print(f"      {out / 'train_pseudo.json'} (fused pseudo masks), {out / 'train_clean.json'} "
          f"({len(findings)} entries flagged)")

    print(f"[6/7] PM-VIS and fully supervised models, {iterations} iterations each")
    pmvis_run = train("pmvis", "pmvis", pseudo_annotations=str(out / "train_pseudo.json"))
    full_run = train("full", "full")
    rows = {"box-only (IDOL-BoxInst)": box_only, "PM-VIS (pseudo masks)": pmvis_run,
            "fully supervised (GT masks)": full_run}
    table = _comparison_table(rows)
    write_text_atomic(out / "comparison.md", table + "\n")
    print(table)

    print("[7/7] pseudo-mask quality report")
    report = build_report(data_dir, pm_dir, out / "report", ReportConfig(filter=filter_cfg),
                          tracking_uri=tracking_uri)
    print(format_report(report))
    print(f"\nplots: {', '.join(str(out / 'report' / p) for p in report['plots'])}")
    print(f"comparison: {out / 'comparison.md'}")
    print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}")
    print(f"outputs in {out}  ({time.perf_counter() - start:.1f} s)")
    return 0


def _comparison_table(rows: dict[str, Any]) -> str:
    """Held-out AP/AR of each training run (against the true masks) as a Markdown table."""
    names = ("AP", "AP50", "AP75", "AR1", "AR10")
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, result in rows.items():
        ev = result.evaluation or {}
        cells = ["-" if ev.get(n) is None else f"{ev[n]:.1f}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
