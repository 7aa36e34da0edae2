"""The embedded default end to end on a local Ray (or the cluster a Ray job runs on); see
:mod:`pmvis.jobs.demo` for the steps."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray

from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.core.io import write_json_atomic, write_text_atomic
from pmvis.models.sources.propagate import PropagationConfig
from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME
from pmvis.models.weights import TINY_PRETRAINED, shipped_weights
from pmvis.platform.cluster import connect
from pmvis.platform.compare import compare_runs, format_comparison, write_comparison
from pmvis.platform.data.results_io import save_results
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis_io import load_ytvis, save_ytvis
from pmvis.platform.demo.config import (
    COMPARISON_KEYS,
    DEMO_FINETUNE_LR,
    DEMO_ITERATIONS,
    DEMO_MAX_CPUS,
    DEMO_SWEEP_ITERATIONS,
    DEMO_SWEEP_SPACE,
    DEMO_SYNTH,
    SWEEP_NAME,
    TINY_ITERATIONS,
    TINY_SWEEP_ITERATIONS,
    TINY_SYNTH,
    TRACK_OPTIONS,
    TRAIN_EXPERIMENT,
    TRAIN_TORCH_THREADS,
    DemoConfig,
)
from pmvis.platform.demo.summary import comparison_table, summary_text
from pmvis.platform.evaluation import evaluate_ytvis, format_metrics_table
from pmvis.platform.experiments import default_tracking_uri, ensure_experiment, retire_runs
from pmvis.platform.predict import annotations_as_results, filled_box_results
from pmvis.platform.pseudo.filters import FilterConfig
from pmvis.platform.pseudo.generate import generate_pseudo_masks
from pmvis.platform.pseudo.plan import PseudoMaskConfig
from pmvis.platform.pseudo.refine import refine
from pmvis.platform.pseudo.store import RAW_DIRNAME
from pmvis.platform.report import ReportConfig, build_report, format_report
from pmvis.platform.train.config import TINY_INFERENCE, TrainConfig
from pmvis.platform.train.driver import resolve_config, run_training
from pmvis.platform.train.pretrain import pretrain_demo_weights
from pmvis.platform.tune.config import SweepConfig
from pmvis.platform.tune.results import format_sweep_result
from pmvis.platform.tune.sweep import run_sweep


def run_demo(cfg: DemoConfig) -> int:
    """The whole demo (the steps of this module's docstring); writes everything under ``cfg.out``."""

    steps = _Steps(total=(8 if cfg.sweep_trials else 7) + (1 if cfg.start == "pretrain" else 0))
    out = Path(cfg.out).resolve()
    values = dict(TINY_SYNTH if cfg.tiny else DEMO_SYNTH)
    if cfg.seed is not None:
        values["seed"] = cfg.seed
    synth_cfg = build_config(SynthConfig, values, source="demo")
    data_dir = out / "data"
    steps.start(f"synthetic dataset -> {data_dir}")
    summary = generate_synthetic(data_dir, synth_cfg, overwrite=True, progress=True)
    print(f"      {summary['videos']} videos, {summary['instances']} instances, {summary['masks']} masks, "
          f"defects {summary['defects']}")

    truth = load_ytvis(data_dir / "truth.json")
    annotations = load_ytvis(data_dir / "annotations.json", check_frames=True)
    steps.start("baselines scored against the true masks")
    for name, results in (("box_baseline", filled_box_results(annotations)),
                          ("annotation_masks", annotations_as_results(annotations))):
        save_results(results, out / f"results_{name}.json")
        metrics = evaluate_ytvis(truth, results)
        write_json_atomic(out / f"metrics_{name}.json", metrics.to_json(), indent=2)
        print(format_metrics_table(metrics, title=f"{name}"))

    sources = list(cfg.sources)
    if cfg.hqsam_checkpoint and "hqsam" not in sources:
        sources.append("hqsam")
    iterations = cfg.iterations or (TINY_ITERATIONS if cfg.tiny else DEMO_ITERATIONS)
    tracking_uri = default_tracking_uri(out / "mlflow")
    # Submitted as a Ray job (RAY_ADDRESS set): use that cluster; otherwise a fresh local Ray.
    connect("auto" if os.environ.get("RAY_ADDRESS") else "local")
    # The demo's steps run one after another: the mask sources may use every CPU of the (small)
    # cluster, one actor per CPU; a training worker uses TRAIN_TORCH_THREADS.
    cpus = max(1, min(int(ray.cluster_resources().get("CPU", 1)), DEMO_MAX_CPUS))

    start_weights = _start_weights(cfg, out, steps)

    lr = {"lr": DEMO_FINETUNE_LR} if start_weights else {}

    def train_config(name: str, mode: str, cpus_per_worker: int, **data: Any) -> Any:
        cfg = TrainConfig.tiny(
            data_dir, iterations=iterations, run_name=name, **lr, storage_path=str(out / "runs"), init_from=start_weights,
            experiment=TRAIN_EXPERIMENT, tracking_uri=tracking_uri, checkpoint_every=iterations,
            cpus_per_worker=cpus_per_worker,
            lr_steps=[int(iterations * 0.8)], loss={"mode": mode},
            data={"eval_annotations": "truth.json", **data},
        )
        shutil.rmtree(out / "runs" / name, ignore_errors=True)  # the data changed: no stale resume
        return cfg

    steps.start(f"box-only model (IDOL-BoxInst, tiny, {iterations} iterations) on Ray Train")
    box_only = run_training(train_config("box_only", "boxinst", TRAIN_TORCH_THREADS))

    options = _source_options(cfg, sources)
    options["boxinst"] = {"checkpoint": str(Path(box_only.checkpoint) / CHECKPOINT_FILENAME),
                          "inference": dict(TINY_INFERENCE)}
    for name in ("hqsam", "track", "boxinst"):
        options.setdefault(name, {})["actors"] = cpus
    sources = sources + (["boxinst"] if "boxinst" not in sources else [])
    pseudo_masks_dir = out / "pseudo_masks"
    shutil.rmtree(pseudo_masks_dir, ignore_errors=True)  # the dataset was regenerated: stored masks are stale
    steps.start(f"pseudo masks ({', '.join(sources)}) on Ray Data -> {pseudo_masks_dir}")
    pm_cfg = build_config(PseudoMaskConfig, {"sources": sources, "source_options": options}, source="demo")
    generate_pseudo_masks(data_dir, pseudo_masks_dir, pm_cfg)

    steps.start("fusion (DOOB, SCM, SHQM) and ground-truth filters (RIA, Missing-Data)")
    filter_cfg = filter_config(options["track"])
    refined = refine(pseudo_masks_dir / RAW_DIRNAME, annotations, fuse=filter_cfg.fuse, filt=filter_cfg)
    save_ytvis(refined.fused, out / "train_pseudo.json")
    save_ytvis(refined.cleaned, out / "train_clean.json")
    findings = refined.filter_report
    write_json_atomic(out / "train_clean.report.json", findings, indent=2)
    print(f"      {out / 'train_pseudo.json'} (fused pseudo masks), {out / 'train_clean.json'} "
          f"({len(findings)} entries flagged)")

    steps.start(f"PM-VIS and fully supervised models, {iterations} iterations each, side by side")
    pmvis_run, full_run = train_side_by_side([
        train_config("pmvis", "pmvis", TRAIN_TORCH_THREADS, pseudo_annotations=str(out / "train_pseudo.json")),
        train_config("full", "full", TRAIN_TORCH_THREADS),
    ])
    rows = dict(zip(COMPARISON_KEYS.values(), (box_only, pmvis_run, full_run)))
    table = comparison_table(rows)
    write_text_atomic(out / "comparison.md", table + "\n")
    write_json_atomic(out / "comparison.json", {key: rows[label].evaluation for key, label in COMPARISON_KEYS.items()},
                      indent=2)
    print(table)

    sweep = comparison = None
    if cfg.sweep_trials:
        sweep_iterations = TINY_SWEEP_ITERATIONS if cfg.tiny else DEMO_SWEEP_ITERATIONS
        steps.start(f"{cfg.sweep_trials}-trial sweep (space {DEMO_SWEEP_SPACE!r}, {sweep_iterations} iterations "
                    "per trial, ASHA) on Ray Tune, then pmvis compare")
        sweep, comparison = _sweep_and_compare(out, data_dir, pseudo_masks_dir, tracking_uri, cfg.sweep_trials,
                                               sweep_iterations, synth_cfg.seed, start_weights)

    steps.start("pseudo-mask quality report")
    report = build_report(data_dir, pseudo_masks_dir, out / "report", ReportConfig(filter=filter_cfg),
                          tracking_uri=tracking_uri)
    print(format_report(report))

    summary = summary_text(out, table, sweep, comparison, report, tracking_uri, steps.elapsed())
    write_text_atomic(out / "summary.md", summary + "\n")
    print("\n" + summary)
    return 0


def _source_options(cfg: DemoConfig, sources: list[str]) -> dict[str, Any]:
    """Per-source options: real checkpoints where given; the tracker is the optical-flow engine
    seeded by GrabCut unless a SAM 2 checkpoint (engine sam2) or an HQ-SAM one (its seeds) is given."""
    options: dict[str, Any] = {"track": dict(TRACK_OPTIONS)}
    if cfg.hqsam_checkpoint:
        options["hqsam"] = {"checkpoint": cfg.hqsam_checkpoint}
        options["track"]["init_from"] = "hqsam"
    if cfg.sam2_checkpoint:
        options["track"].update(engine="sam2", checkpoint=cfg.sam2_checkpoint)
    if "hqsam" in sources and not cfg.hqsam_checkpoint:
        print("      note: hqsam has no checkpoint (--hqsam-checkpoint): it runs with random weights and only adds noise")
    if not (cfg.hqsam_checkpoint or cfg.sam2_checkpoint):
        print("      HQ-SAM and SAM 2 are skipped: no checkpoints given (--hqsam-checkpoint, --sam2-checkpoint); "
              "the weight-free sources are GrabCut and the optical-flow tracker")
    return options


def filter_config(track_options: dict[str, Any]) -> Any:
    """The filters' config for the demo's tracker. FilterConfig's Missing-Data threshold (0.8) is on
    SAM 2's object-score scale; the flow engine reports a mask only where its own confidence reaches
    ``flow_present_threshold``, so Missing-Data takes every mask it reports (benchmark data, seed 0:
    recall 0.18 → 0.64 at precision 1.00 → 0.95)."""

    track = PropagationConfig.model_validate(track_options)
    if track.engine == "flow":
        return FilterConfig(missing_min_confidence=track.flow_present_threshold)
    return FilterConfig()


def _start_weights(cfg: DemoConfig, out: Path, steps: "_Steps") -> str | None:
    """The weights every training starts from: the shipped pretrained tiny model, a freshly
    pretrained one (--pretrain, the same command that made the shipped file), or none."""

    if cfg.start == "scratch":
        return None
    if cfg.start == "pretrain":
        steps.start("box-supervised pretraining on synthetic stills (pmvis pretrain, as the shipped weights)")
        return str(pretrain_demo_weights(out / "pretrain"))
    return str(shipped_weights(TINY_PRETRAINED))


def train_side_by_side(configs: list[Any]) -> list[Any]:
    """Run trainings at the same time, each driven from its own Ray task (as Tune drives a trial).

    Each Ray Train run spends ~30 s starting processes and importing before its first iteration;
    side by side those start-ups overlap instead of adding up. A failed training's PmvisError is
    re-raised as itself (its message names the problem), not wrapped in Ray's task error. The
    MLflow stores and experiments are made here first: two runs creating a new sqlite store at
    once race in its schema migration ("duplicate column name").
    """

    configs = [resolve_config(c) for c in configs]
    for uri, experiment in dict.fromkeys((c.tracking_uri, c.experiment) for c in configs):
        ensure_experiment(experiment, uri)
    remote_training = ray.remote(num_cpus=0, max_retries=0)(run_training)
    refs = [remote_training.remote(cfg) for cfg in configs]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, PmvisError):
            raise e.cause from None
        raise


class _Steps:
    """Numbered step headers with the time each step took (users see where the minutes go)."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0
        self.t0 = self.t = time.perf_counter()

    def start(self, title: str) -> None:
        now = time.perf_counter()
        if self.n:
            print(f"      ({now - self.t:.0f} s)")
        self.n, self.t = self.n + 1, now
        print(f"[{self.n}/{self.total}] {title}", flush=True)

    def elapsed(self) -> float:
        print(f"      ({time.perf_counter() - self.t:.0f} s)")
        return time.perf_counter() - self.t0


def _sweep_and_compare(out: Path, data_dir: Path, pseudo_masks_dir: Path, tracking_uri: str, trials: int,
                       iterations: int, seed: int, start_weights: str | None) -> tuple[Any, Any]:
    """The closing sweep from the cached raw masks (models not rerun), then its MLflow comparison."""

    storage = out / "sweeps"
    # The dataset was regenerated: a previous demo's sweep is stale (not resumed, not compared).
    shutil.rmtree(storage / SWEEP_NAME, ignore_errors=True)
    retire_runs(tracking_uri, (SWEEP_NAME, f"{SWEEP_NAME}-train"))
    cfg = SweepConfig(
        space=DEMO_SWEEP_SPACE, data_dir=str(data_dir), pseudo_masks=str(pseudo_masks_dir), name=SWEEP_NAME,
        storage_path=str(storage), samples=trials, search="random", scheduler="asha",
        iterations=iterations, preset="tiny", tracking_uri=tracking_uri, seed=seed,
        train_overrides={"checkpoint_every": max(iterations // 2, 1), "lr_steps": [int(iterations * 0.8)],
                         "init_from": start_weights, "data": {"eval_annotations": "truth.json"},
                         **({"lr": DEMO_FINETUNE_LR} if start_weights else {})},
    )
    sweep = run_sweep(cfg)
    print(format_sweep_result(sweep))
    comparison = compare_runs(SWEEP_NAME, metric="AP", tracking_uri=tracking_uri)
    print(format_comparison(comparison))
    paths = write_comparison(comparison, out / "compare")
    print(f"      written: {paths['csv']}, {paths['png']}")
    return sweep, comparison
