"""Pseudo-mask quality report: per-source and fused IoU against the truth, filter precision/recall
against the injected defects, PNG plots, and one MLflow run holding all of it.

Quality is measured on the frames where the user's annotation has a box (the frames a
box-prompted source is asked about), so sources are compared on the same frames.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from pmvis.core.config import StrictConfig, dump_config
from pmvis.core.errors import PmvisError
from pmvis.core.io import atomic_path, read_json, write_json_atomic, write_text_atomic
from pmvis.core.masks import decode_mask
from pmvis.platform.data.ytvis import DEFECTS_FILENAME, TRUTH_FILENAME, YTVISDataset
from pmvis.platform.data.ytvis_io import load_dataset_dir, load_ytvis
from pmvis.platform.experiments import log_outputs, mlflow_run
from pmvis.platform.predict import filled_box_results
from pmvis.platform.pseudo.filters import FilterConfig
from pmvis.platform.pseudo.refine import refine
from pmvis.platform.pseudo.store import RAW_DIRNAME
from pmvis.platform.spatiotemporal_iou import mask_quality

IOU_LEVELS = (0.5, 0.75)


class ReportConfig(StrictConfig):
    """Every knob of a report (the fusion and filter knobs are the ones Tune sweeps)."""

    filter: FilterConfig = FilterConfig()
    example_frames: int = 4
    experiment: str = "pmvis-pseudo-masks"


def _on_box_frames(segs: list, boxes: list) -> list:
    return [s if b is not None else None for s, b in zip(segs, boxes)]


def _quality_of(gt: YTVISDataset, truth: YTVISDataset, segs_by_ann: dict[int, list]) -> dict[str, Any]:
    """Spatio-temporal IoU of the given masks vs the truth, both restricted to the GT-box frames."""
    by_id = {a.id: a for a in gt.annotations}
    pred, ref = [], []
    truth_by_id = {a.id: a for a in truth.annotations}
    for aid, segs in segs_by_ann.items():
        a = by_id[aid]
        if aid not in truth_by_id:
            raise PmvisError(f"annotation id={aid} is not in the truth file {truth.path}")
        pred.append(dataclasses.replace(a, segmentations=_on_box_frames(segs, a.bboxes)))
        ref.append(dataclasses.replace(truth_by_id[aid], segmentations=_on_box_frames(
            truth_by_id[aid].segmentations, a.bboxes)))
    ref_ds = dataclasses.replace(truth, annotations=ref)
    q = mask_quality(pred, ref_ds)
    values = [v for v in q.per_annotation.values() if v is not None]
    out = {"mean_iou": q.mean, "annotations": len(values), "per_annotation": q.per_annotation}
    for level in IOU_LEVELS:
        out[f"share_above_{level}"] = q.share_above(level)
    return out


def _filter_scores(report: list[dict], defects: list[dict]) -> dict[str, Any]:
    """Precision/recall of the filters' findings against the injected defects, per kind."""
    out: dict[str, Any] = {}
    for kind in ("inaccurate", "missing"):
        found = {(r["video_id"], r["annotation_id"], r["frame"]) for r in report if r["kind"] == kind}
        true = {(d["video_id"], d["annotation_id"], d["frame"]) for d in defects if d["kind"] == kind}
        hit = len(found & true)
        out[kind] = {
            "found": len(found), "injected": len(true), "correct": hit,
            "precision": hit / len(found) if found else None,
            "recall": hit / len(true) if true else None,
        }
    return out


def _plot_quality(quality: dict[str, dict], path: Path) -> None:
    matplotlib.use("Agg")

    names = list(quality)
    metrics = ["mean_iou"] + [f"share_above_{lv}" for lv in IOU_LEVELS]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        vals = [quality[n][m] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=m.replace("_", " "))
    ax.set_xticks(np.arange(len(names)) + width * (len(metrics) - 1) / 2, names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("vs true masks")
    ax.set_title("pseudo-mask quality per source")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_histograms(quality: dict[str, dict], path: Path) -> None:
    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 21)
    for name, q in quality.items():
        vals = [v for v in q["per_annotation"].values() if v is not None]
        ax.hist(vals, bins=bins, histtype="step", linewidth=1.6, label=name)
    ax.set_xlabel("spatio-temporal IoU with the true mask (per annotation)")
    ax.set_ylabel("annotations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_examples(gt: YTVISDataset, masks: dict[str, dict[int, list]], n: int, path: Path) -> None:
    """A few frames, one column per source, masks drawn as coloured overlays with outlines."""

    matplotlib.use("Agg")

    picks: list[tuple[int, int]] = []
    for vid, anns in sorted(gt.annotations_by_video().items()):
        frames = [t for t in range(gt.videos[vid].length) if any(a.bboxes[t] is not None for a in anns)]
        if frames:
            picks.append((vid, frames[len(frames) // 2]))
        if len(picks) >= n:
            break
    if not picks:
        return
    names = list(masks)
    fig, axes = plt.subplots(len(picks), len(names), figsize=(2.6 * len(names), 2.1 * len(picks)), squeeze=False)
    colours = plt.get_cmap("tab10")
    anns_by_video = gt.annotations_by_video()
    for r, (vid, t) in enumerate(picks):
        frame = gt.read_frame(vid, t)
        for c, name in enumerate(names):
            img = frame.astype(np.float32)
            for k, a in enumerate(anns_by_video[vid]):
                segs = masks[name].get(a.id)
                if not segs or segs[t] is None:
                    continue
                m = decode_mask(segs[t])
                colour = np.array(colours(k % 10)[:3]) * 255
                img[m] = 0.55 * img[m] + 0.45 * colour
                contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                img = np.ascontiguousarray(img)
                cv2.drawContours(img, contours, -1, tuple(float(v) for v in colour), 1)
            ax = axes[r][c]
            ax.imshow(img.clip(0, 255).astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"video {vid}, frame {t}", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def build_report(
    data_dir: str | os.PathLike,
    pseudo_masks_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ReportConfig,
    *,
    truth: str | os.PathLike | None = None,
    annotations: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Compute the report, write ``out_dir/report.json`` and PNGs, log one MLflow run; return it."""

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    gt = load_dataset_dir(data_dir, annotations)
    refined = refine(Path(pseudo_masks_dir) / RAW_DIRNAME, gt, fuse=config.filter.fuse, filt=config.filter,
                     read_all=True)  # every source: the report shows each one
    tracks, fused, filter_report = refined.tracks, refined.fused, refined.filter_report

    masks: dict[str, dict[int, list]] = {}
    for t in tracks:
        masks.setdefault(t.source, {})[t.annotation_id] = t.segmentations
    masks["fused"] = {a.id: a.segmentations for a in fused.annotations}
    masks["filled box"] = {a.id: r.segmentations for a, r in zip(gt.annotations, filled_box_results(gt))}

    result: dict[str, Any] = {"data": str(data_dir.resolve()), "pseudo_masks": str(Path(pseudo_masks_dir).resolve()),
                              "sources": sorted({t.source for t in tracks}),
                              "filter_findings": {k: sum(r["kind"] == k for r in filter_report)
                                                  for k in ("inaccurate", "missing")}}
    truth_path = Path(truth) if truth else data_dir / TRUTH_FILENAME
    quality: dict[str, dict] = {}
    if truth or truth_path.exists():
        truth_ds = load_ytvis(truth_path)
        quality = {name: _quality_of(gt, truth_ds, segs) for name, segs in masks.items()}
        result["quality"] = {n: {k: v for k, v in q.items() if k != "per_annotation"} for n, q in quality.items()}
    defects_path = data_dir / DEFECTS_FILENAME
    if defects_path.exists():
        result["filters"] = _filter_scores(filter_report, read_json(defects_path))

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if quality:
        _plot_quality(quality, out_dir / "quality_by_source.png")
        _plot_histograms(quality, out_dir / "iou_histograms.png")
        plots += ["quality_by_source.png", "iou_histograms.png"]
    _plot_examples(gt, {k: v for k, v in masks.items() if k != "filled box"}, config.example_frames,
                   out_dir / "examples.png")
    plots.append("examples.png")
    result["plots"] = plots
    write_json_atomic(out_dir / "report.json", result, indent=2)
    write_json_atomic(out_dir / "filter_findings.json", filter_report, indent=2)
    write_text_atomic(out_dir / "report_config.yaml", dump_config(config))

    metrics: dict[str, float] = {}
    for name, q in result.get("quality", {}).items():
        key = name.replace(" ", "_")
        for k, v in q.items():
            if isinstance(v, (int, float)) and v is not None:
                metrics[f"{key}.{k}"] = float(v)
    for kind, s in result.get("filters", {}).items():
        for k in ("precision", "recall", "found"):
            if s[k] is not None:
                metrics[f"filter.{kind}.{k}"] = float(s[k])
    with mlflow_run(config.experiment, run_name="report", tracking_uri=tracking_uri,
                    params=config.model_dump(mode="json"),
                    tags={"pmvis.data": str(data_dir.resolve())}) as run:
        log_outputs(metrics, out_dir)
        result["mlflow_run_id"] = run.info.run_id
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = []
    if "quality" in result:
        lines.append(f"{'masks':<12} {'mean IoU':>9} {'>0.5':>7} {'>0.75':>7}")
        for name, q in result["quality"].items():
            def f(v):
                return "    -" if v is None else f"{v:.3f}"
            lines.append(f"{name:<12} {f(q['mean_iou']):>9} {f(q['share_above_0.5']):>7} {f(q['share_above_0.75']):>7}")
    for kind, s in result.get("filters", {}).items():
        p = "-" if s["precision"] is None else f"{s['precision']:.2f}"
        r = "-" if s["recall"] is None else f"{s['recall']:.2f}"
        lines.append(f"filter {kind:<10}: found {s['found']}, injected {s['injected']}, precision {p}, recall {r}")
    return "\n".join(lines)
