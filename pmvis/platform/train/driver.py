"""Start (or resume) a training run on Ray Train (V2) and report what it did.

:func:`run_training` checks the config and data (:func:`preflight`: data files, every frame file,
backbone weights, the resume checkpoint), opens (or, on resume, re-opens) the MLflow run, writes
the effective config next to the run and launches a ``TorchTrainer`` with
``ScalingConfig(num_workers, use_gpu)`` and ``RunConfig(name=run_name, storage_path=...)``. Workers
build the model (DDP through ``ray.train.torch.prepare_model``: gloo on CPU, NCCL on GPU) and train
on clip batches of their own shard of videos (:mod:`pmvis.platform.train.worker`).

Resume: a run is the directory ``storage_path/run_name``, locked while it runs (:func:`run_lock`: a
second run of the same name is refused up front). The workers resume from the newest *complete*
``checkpoint_*`` directory there (:func:`pmvis.platform.train.checkpoints.latest_checkpoint`), not
from Ray's checkpoint manager snapshot, which Ctrl-C can leave unwritten and which may name a copy
cut short — after a worker failure (``FailureConfig(max_failures)``: the whole worker group
restarts) and when the user runs the same command again after a crash or Ctrl-C (the CLI then says
where the rerun resumes and exits 130). The checkpoint holds the model, optimizer and scheduler
state and the iteration count, so training continues at the next iteration with the same batches
(the sampler is a pure function of seed, rank and iteration). The MLflow run id is stored in the
checkpoint and its record, and the driver re-opens that run. V2 caveat: the controller takes in a
worker's reports when it polls it (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s), so a
checkpoint reported within ~2 s of a crash may not be registered; the restart then resumes from the
one before.

MLflow (rank 0 and the driver only; docs/design.md §6: no MLflowLoggerCallback on a Train V2
RunConfig): params = the whole config flattened; metrics every ``log_every`` iterations = every loss
term, ``lr``, ``lr_backbone``, ``it_per_s``; ``eval_*`` metrics; artifacts = ``config.yaml`` and the
final ``evaluation.json``. Console: every ``print_every`` iterations rank 0 logs one progress line;
Ray Train's own INFO chatter is kept off the console (:mod:`pmvis.platform.ray_logs`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pmvis.core.config import dump_config
from pmvis.core.errors import PmvisError
from pmvis.core.io import write_json_atomic, write_text_atomic
from pmvis.core.tables import format_table
from pmvis.models.vis.backbone import Backbone
from pmvis.models.vis.checkpoint import check_compatible, initial_weights, read_checkpoint
from pmvis.models.vis.config import ModelConfig
from pmvis.platform.data.clips import build_sampler
from pmvis.platform.data.vis_data import load_training_data
from pmvis.platform.evaluation import METRIC_NAMES
from pmvis.platform.experiments import default_tracking_uri, end_run, log_artifact, open_run
from pmvis.platform.ray_logs import quiet_ray_train, ray_train_logging_config
from pmvis.platform.train.checkpoints import (
    final_checkpoint,
    is_complete,
    is_remote,
    latest_checkpoint,
    read_checkpoint_meta,
)
from pmvis.platform.train.config import TrainConfig
from pmvis.platform.train.loop import inference_config
from pmvis.platform.train.worker import train_loop_per_worker

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"


EVALUATION_FILENAME = "evaluation.json"


RUN_LOCK_FILENAME = ".pmvis.lock"  # in the run directory, flock-ed while a run is alive


MAX_LISTED_PROBLEMS = 5  # an error message names this many missing files, then counts the rest



@dataclass
class TrainResult:
    """What :func:`run_training` returns."""

    run_name: str
    run_dir: str  # storage_path/run_name: Ray's run directory, config.yaml, evaluation.json
    iteration: int  # completed iterations
    start_iteration: int  # where this invocation started (> 0: resumed)
    metrics: dict[str, Any]  # the last reported metrics (loss terms, lr, it_per_s, eval_*)
    checkpoint: str | None  # the latest checkpoint directory (holds checkpoint.pt)
    best_checkpoint: str | None  # the kept checkpoint with the best eval_AP, else the latest
    mlflow_run_id: str | None
    tracking_uri: str
    evaluation: dict[str, Any] | None  # evaluate_ytvis JSON of the held-out videos (None: not evaluated)
    config_path: str
    steady_it_per_s: float | None = None  # iterations/s after the first iteration of this invocation
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths (workers run elsewhere), a run name, a tracking URI."""
    def absolute(p: str | None) -> str | None:
        return None if p is None or is_remote(p) else str(Path(p).expanduser().resolve())

    data = cfg.data.model_copy(update={"data_dir": absolute(cfg.data.data_dir)})
    debug = cfg.debug.model_copy(update={"fail_marker": absolute(cfg.debug.fail_marker)})
    model = cfg.model.model_copy(update={"backbone_weights": absolute(cfg.model.backbone_weights)})
    name = cfg.run_name or f"pmvis-train-{datetime.now():%Y%m%d-%H%M%S}"
    return cfg.model_copy(update={
        "model": model, "data": data, "debug": debug, "run_name": name,
        "storage_path": absolute(cfg.storage_path) or cfg.storage_path,
        "init_from": absolute(cfg.init_from), "tracking_uri": cfg.tracking_uri or default_tracking_uri()})


def _worker_pmvis_error(error: BaseException) -> str | None:
    """The message of a PmvisError raised in a worker, if that is what failed the run."""
    failures = getattr(error, "worker_failures", None) or {}
    for exc in failures.values():
        for e in (exc, getattr(exc, "cause", None), getattr(exc, "__cause__", None)):
            if isinstance(e, PmvisError):
                return str(e)
        text = str(exc)
        if "PmvisError" in text:
            tail = text.split("PmvisError:", 1)[-1].strip()
            return tail.splitlines()[0] if tail else text
    return None


def check_resources(cfg: TrainConfig) -> None:
    """Refuse a request the connected cluster can never satisfy (Ray would wait forever)."""
    if not ray.is_initialized() or os.environ.get("PMVIS_WAIT_FOR_RESOURCES"):
        return
    total = ray.cluster_resources()
    if cfg.use_gpu and total.get("GPU", 0) < 1:
        raise PmvisError("use_gpu is true but the Ray cluster has no GPU (it would wait forever); set use_gpu: "
                         "false, or start GPU nodes (PMVIS_WAIT_FOR_RESOURCES=1 waits for an autoscaler)")
    need_gpu = cfg.num_workers if cfg.use_gpu else 0
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if total.get("CPU", 0) < need_cpu or total.get("GPU", 0) < need_gpu:
        raise PmvisError(f"{cfg.num_workers} workers need {need_cpu} CPUs and {need_gpu} GPUs; the Ray cluster has "
                         f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs "
                         "(PMVIS_WAIT_FOR_RESOURCES=1 waits for an autoscaler)")


def run_dir_of(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}"


_held_locks: dict[str, list[int]] = {}  # lock file -> [fd, depth]: run_lock is re-entrant within a process


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold the run's lock (``flock`` on ``run_dir/.pmvis.lock``) for the block: a second
    `pmvis train` of the same run is refused up front instead of racing the first through Ray and
    MLflow. The OS releases the lock when the holder dies, so a crashed run never blocks a rerun.
    Re-entrant in one process (the CLI holds it across connect + :func:`run_training`, which takes
    it too); a no-op for remote storage."""
    if is_remote(run_dir):
        yield
        return
    path = str(Path(run_dir) / RUN_LOCK_FILENAME)
    held = _held_locks.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PmvisError(f"run {Path(run_dir).name} is already running (pid {holder}); wait for it or choose "
                         f"another run_name (lock: {path})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held_locks[path] = [fd, 1]
        yield
    finally:
        _held_locks.pop(path, None)
        os.close(fd)  # releases the flock


def preflight(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Everything that can be checked before Ray starts: the config with absolute paths and a run
    name (:func:`resolve_config`), the data files, every frame file, categories, split and shards,
    ``model.backbone_weights``, and the checkpoint to resume from (the newest complete one, loaded
    in full) or ``init_from``, of the same architecture. A bad input found later, in a worker,
    costs a Ray start-up (and, raised there, ``max_failures`` restarts). Returns (config, resume
    meta or None)."""
    cfg = resolve_config(cfg)
    need_gt, need_pseudo = cfg.loss.mode == "full", cfg.loss.mode == "pmvis"
    data = load_training_data(cfg.data, num_classes=cfg.model.num_classes, need_gt_masks=need_gt,
                              need_pseudo=need_pseudo, load_eval=False)
    check_frame_files(data.dataset, data.train_videos + data.val_videos)
    build_sampler(data, cfg.data, batch_size=cfg.batch_size, stride=cfg.model.mask_stride,
                world_size=cfg.num_workers, need_gt_masks=need_gt, need_pseudo=need_pseudo,
                supervise_all_frames=cfg.loss.loss_frames == "all")
    inference_config(cfg.inference)  # a typo in the evaluation knobs fails now, not after training
    if cfg.model.backbone_weights is not None:
        check_backbone_weights(cfg.model)
    resume_meta = None
    latest = latest_checkpoint(run_dir_of(cfg))
    if latest is not None:
        resume_meta = read_checkpoint_meta(latest)
        check_compatible({**resume_meta, "path": latest}, cfg.model)
        check_compatible(read_checkpoint(latest), cfg.model)  # the weights file itself, as the workers load it
    elif cfg.init_from:
        initial_weights(read_checkpoint(cfg.init_from), cfg.model)
    return cfg, resume_meta


def check_frame_files(dataset: Any, video_ids: list[int]) -> None:
    """Every frame of these videos is a file (stat calls only; decoding is the workers' job)."""
    missing = [(v, t, dataset.frame_path(v, t)) for v in video_ids for t in range(dataset.videos[v].length)
               if not dataset.frame_path(v, t).is_file()]
    if missing:
        listed = "; ".join(f"video id={v}, frame {t} ({p})" for v, t, p in missing[:MAX_LISTED_PROBLEMS])
        more = f" and {len(missing) - MAX_LISTED_PROBLEMS} more" if len(missing) > MAX_LISTED_PROBLEMS else ""
        raise PmvisError(f"{dataset.path}: {len(missing)} frame files are missing: {listed}{more}")


def check_backbone_weights(model_cfg: ModelConfig) -> None:
    """``model.backbone_weights`` loads into the configured backbone (the workers build it too)."""
    Backbone(model_cfg.backbone, list(model_cfg.backbone_strides), weights=model_cfg.backbone_weights, freeze_bn=False)


def run_training(cfg: TrainConfig, *, callbacks: list[Any] | None = None) -> TrainResult:
    """Train on Ray Train; the same ``run_name`` + ``storage_path`` resumes from the latest checkpoint.

    ``callbacks``: extra Ray Train ``UserCallback``s for the TorchTrainer's RunConfig, e.g.
    ``ray.tune.integration.ray_train.TuneReportCallback()`` when a Tune trial drives the run
    (`pmvis sweep`): every report of the workers then reaches Tune.

    The run's lock (:func:`run_lock`) is held throughout. Ctrl-C raises :class:`TrainingInterrupted`
    (Ray Train's own SIGINT handler aborts the workers and exits through SystemExit)."""
    cfg = resolve_config(cfg)
    with run_lock(run_dir_of(cfg)):
        return _run_training_locked(cfg, callbacks)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_training`; the message says where a rerun resumes (CLI: exit 130)."""


def _interrupted_message(cfg: TrainConfig) -> str:
    try:
        latest = latest_checkpoint(run_dir_of(cfg))
        iteration = read_checkpoint_meta(latest).get("iteration") if latest else None
    except PmvisError:
        iteration = "?"
    if iteration is None:
        return f"run {cfg.run_name} interrupted before its first checkpoint; rerun the same command to start it again"
    return (f"run {cfg.run_name} interrupted at iteration {iteration} (its last complete checkpoint); "
            "rerun the same command to resume")


def _run_training_locked(cfg: TrainConfig, callbacks: list[Any] | None) -> TrainResult:
    cfg, resume_meta = preflight(cfg)
    run_dir = run_dir_of(cfg)
    check_resources(cfg)
    if resume_meta is not None:
        logger.info("resuming run %s from %s (iteration %s)", cfg.run_name, resume_meta["path"],
                    resume_meta.get("iteration"))
    run_id = open_run(cfg, run_dir, resume_meta)
    config_path = f"{run_dir}/{CONFIG_FILENAME}"
    try:
        if not is_remote(run_dir):
            write_text_atomic(config_path, dump_config(cfg))
            log_artifact(cfg.tracking_uri, run_id, config_path)
        quiet_ray_train()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"train_config": cfg.model_dump(mode="json"), "run_dir": run_dir,
                               "mlflow_run_id": run_id, "tracking_uri": cfg.tracking_uri},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage_path,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 callbacks=list(callbacks or []), logging_config=ray_train_logging_config()),
        )
        try:
            result = trainer.fit()
        except (KeyboardInterrupt, SystemExit):
            raise TrainingInterrupted(_interrupted_message(cfg)) from None
        except Exception as e:
            message = _worker_pmvis_error(e)
            if message is not None:
                raise PmvisError(message) from None
            raise
        rv = result.return_value or {}
        if rv.get("status") == "error":
            raise PmvisError(rv["failure"]["message"])
        if rv.get("status") == "nonfinite":
            f = rv["failure"]
            last = rv.get("last_checkpoint") or "none (no checkpoint was written yet)"
            raise PmvisError(f"training stopped: {f['message']}; last good checkpoint: {last}")
        evaluation = rv.get("evaluation")
        if evaluation is not None and not is_remote(run_dir):
            eval_path = f"{run_dir}/{EVALUATION_FILENAME}"
            write_json_atomic(eval_path, evaluation, indent=1)
            log_artifact(cfg.tracking_uri, run_id, eval_path)
        checkpoint = final_checkpoint(run_dir, result)
        best = checkpoint
        scored = [(m.get("eval_AP"), c) for c, m in (result.best_checkpoints or [])
                  if isinstance(m.get("eval_AP"), (int, float))]
        if scored:
            best = str(max(scored, key=lambda x: x[0])[1].path)
            if not is_remote(run_dir) and not is_complete(best):
                best = checkpoint
        end_run(cfg.tracking_uri, run_id, "FINISHED")
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            end_run(cfg.tracking_uri, run_id, status)
        except Exception:  # noqa: BLE001
            pass
        raise
    metrics = dict(result.metrics or {})
    return TrainResult(
        run_name=cfg.run_name, run_dir=run_dir, iteration=int(rv.get("iteration", metrics.get("iteration", 0))),
        start_iteration=int(rv.get("start_iteration", 0)), metrics=metrics, checkpoint=checkpoint,
        best_checkpoint=best, mlflow_run_id=run_id, tracking_uri=cfg.tracking_uri, evaluation=evaluation,
        config_path=config_path, steady_it_per_s=rv.get("steady_it_per_s"))


def format_train_result(result: TrainResult) -> str:
    """What a finished run prints: the last loss terms, the held-out AP/AR, where things went."""
    m = result.metrics
    lines = [f"pmvis train: run {result.run_name} — iteration {result.iteration}"
             + (f" (resumed at {result.start_iteration})" if result.start_iteration else "")]
    main = ["loss", "class", "l1", "giou", "proj", "pairwise", "pseudo_focal", "pseudo_dice", "mask_focal",
            "mask_dice", "tk", "track", "track_aux", "lr", "it_per_s"]
    rows = [(k, m[k]) for k in main if isinstance(m.get(k), (int, float))]
    width = max((len(k) for k, _ in rows), default=0)
    lines += [f"  {k:<{width}}  {v:.6g}" for k, v in rows]
    if result.evaluation:
        ev = result.evaluation
        cells = ["   -  " if ev.get(n) is None else f"{ev[n]:6.2f}" for n in METRIC_NAMES]
        lines.append("held-out evaluation:")
        table = format_table(METRIC_NAMES, [cells], align="r" * len(METRIC_NAMES))
        lines += ["  " + line for line in table.splitlines()]
    else:
        lines.append("held-out evaluation: none (no held-out videos, or the inference module is not available)")
    lines.append(f"checkpoint:      {result.checkpoint}")
    if result.best_checkpoint != result.checkpoint:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    lines.append(f"config:          {result.config_path}")
    lines.append(f"MLflow run:      {result.mlflow_run_id} ({result.tracking_uri})")
    return "\n".join(lines)
