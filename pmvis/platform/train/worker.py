"""Ray Train's per-worker function: resume, the step loop, and what happens around a step.

A PmvisError in a worker (a frame that cannot be read, …) is made known to every rank through a
collective (:func:`agree_on_error`) and they all return it, as does a non-finite loss: returned,
not raised, so Ray does not burn ``max_failures`` retries on a deterministic failure. What happens
after a step — evaluation, MLflow metrics, reports with checkpoints — is a list of hooks, each
with its own cadence. V2: one rank's checkpoint is enough, the other ranks report the same metrics
with ``checkpoint=None`` (every rank must call report the same number of times).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pmvis.core.errors import PmvisError
from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME, read_checkpoint
from pmvis.platform.progress import ProgressPrinter
from pmvis.platform.ray_logs import install_train_worker_log_filters
from pmvis.platform.train.checkpoints import (
    checkpoint_dir_name,
    is_remote,
    latest_checkpoint,
    remove_stale_temp_checkpoints,
    temp_checkpoint_prefix,
    write_checkpoint_dir,
)
from pmvis.platform.train.config import DebugConfig, TrainConfig
from pmvis.platform.train.loop import NonFiniteLoss, TrainingLoop

logger = logging.getLogger(__name__)

MAX_ERROR_MESSAGE_BYTES = 4096  # a worker's PmvisError message shared with the other ranks, cut to this


class WorkerInputError(Exception):
    """A PmvisError on one rank, made known to every rank (:func:`agree_on_error`): they all stop
    and return it, so Ray does not restart the worker group for a deterministic bad input."""


def agree_on_error(error: PmvisError | None, device: Any = "cpu") -> None:
    """Collective: raise :class:`WorkerInputError` on every rank when any rank passes an error.

    A rank that raised alone would leave the others blocked in a collective, and a raised
    exception makes Ray retry the whole group ``max_failures`` times on the same bad input."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise WorkerInputError(str(error))
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(flag)
    if float(flag.item()) == 0.0:
        return
    # The messages as fixed-size byte tensors on the collective's device (NCCL needs them there).
    text = b"" if error is None else str(error).encode()[:MAX_ERROR_MESSAGE_BYTES]
    mine = torch.zeros(MAX_ERROR_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    mine[:len(text)] = torch.tensor(list(text), dtype=torch.uint8, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    messages = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]
    raise WorkerInputError(next((m for m in messages if m), "a worker failed on bad input"))


def _eval_metrics(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    if not evaluation:
        return {}
    return {f"eval_{k}": float(v) for k, v in evaluation.items() if isinstance(v, (int, float)) and v is not None}


def _maybe_fail(debug: DebugConfig, iteration: int, rank: int) -> None:
    if debug.fail_at_iteration != iteration or debug.fail_rank != rank:
        return
    if debug.fail_marker is not None:
        marker = Path(debug.fail_marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed at iteration {iteration} on rank {rank}\n")
    logger.warning("debug: injected failure at iteration %d on rank %d (%s)", iteration, rank, debug.fail_mode)
    time.sleep(debug.fail_delay_s)
    if debug.fail_mode == "exit":
        os._exit(1)
    if debug.fail_mode == "error":
        raise PmvisError(f"debug: injected error at iteration {iteration} on rank {rank}")
    raise RuntimeError(f"debug: injected failure at iteration {iteration} on rank {rank}")


class _NoMetrics:
    """The metrics logger of the ranks that do not log (and of a run without MLflow)."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def tag(self, key: str, value: str) -> None:
        pass


@dataclass
class StepEnd:
    """What the hooks after a step see: ``done`` iterations completed, whether it is the last one,
    the metrics to log and report (hooks add to them), and whether this step is evaluated."""

    done: int
    final: bool
    evaluated: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


class Hook:
    """Something that runs after some steps (detectron2-style): every ``every`` completed iterations
    (0: never) and after the last one. Hooks run in list order."""

    def __init__(self, every: int) -> None:
        self.every = every

    def due(self, step: StepEnd) -> bool:
        return step.final or (self.every > 0 and step.done % self.every == 0)

    def __call__(self, step: StepEnd) -> None:
        raise NotImplementedError


class EvaluateHook(Hook):
    """Held-out AP on rank 0 (every rank learns of a bad input there); ``eval_*`` into the metrics."""

    def __init__(self, every: int, evaluate: Callable[[], dict[str, Any] | None]) -> None:
        super().__init__(every)
        self.evaluate = evaluate
        self.last: dict[str, Any] | None = None

    def __call__(self, step: StepEnd) -> None:
        self.last = self.evaluate()
        step.metrics.update(_eval_metrics(self.last))


class LogHook(Hook):
    """MLflow metrics from rank 0, on its own cadence and whenever the step was evaluated."""

    def __init__(self, every: int, metrics_logger: Any, rank: int) -> None:
        super().__init__(every)
        self.metrics_logger, self.rank = metrics_logger, rank

    def due(self, step: StepEnd) -> bool:
        return super().due(step) or step.evaluated

    def __call__(self, step: StepEnd) -> None:
        if self.rank == 0:
            self.metrics_logger.log(step.metrics, step=step.done)


class ReportHook(Hook):
    """``ray.train.report`` with a checkpoint every ``checkpoint_every``; an evaluated step is
    reported too (Tune sees its AP), without a checkpoint when none is due."""

    def __init__(self, every: int, report: Callable[[dict[str, Any], bool], None]) -> None:
        super().__init__(every)
        self.report = report

    def due(self, step: StepEnd) -> bool:
        return super().due(step) or step.evaluated

    def __call__(self, step: StepEnd) -> None:
        self.report(step.metrics, super().due(step))



def train_loop_per_worker(config: dict) -> dict[str, Any] | None:
    """Ray Train's per-worker function. ``config``: ``train_config`` (the TrainConfig as JSON),
    ``run_dir``, ``mlflow_run_id``, ``tracking_uri`` (set by :func:`run_training`)."""
    install_train_worker_log_filters()
    cfg = TrainConfig.model_validate(config["train_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    run_dir = str(config["run_dir"])
    run_id, uri = config.get("mlflow_run_id"), config.get("tracking_uri")

    def wrap(model: Any) -> Any:
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": cfg.find_unused_parameters})

    remove_stale_temp_checkpoints()
    last_checkpoint: str | None = None
    loop: TrainingLoop | None = None
    try:
        loop = TrainingLoop(cfg, rank=rank, world_size=world, device=device, wrap=wrap)
        resume_from = _resume_checkpoint(run_dir)
        if resume_from is not None:
            with resume_from.as_directory() as d:
                loop.restore(read_checkpoint(Path(d) / CHECKPOINT_FILENAME))
            last_checkpoint = f"{run_dir}/{checkpoint_dir_name(loop.iteration)}"
            logger.info("rank %d: resumed from %s at iteration %d", rank, resume_from.path, loop.iteration)
        elif cfg.init_from:
            loop.init_weights(read_checkpoint(cfg.init_from))
        setup_error = None
    except PmvisError as e:
        setup_error = e
    try:
        agree_on_error(setup_error, device)
    except WorkerInputError as e:
        if loop is not None:
            loop.close()
        return _error_value(rank, str(e), run_id)
    assert loop is not None  # no error anywhere: every rank built its loop
    loop.distribute()
    start = loop.iteration
    mlf: Any = _NoMetrics()
    if rank == 0 and run_id:
        # here, not at module import: MLflow takes ~2 s to import and only rank 0 logs
        from pmvis.platform.experiments import MetricsLogger

        mlf = MetricsLogger(uri, run_id)
    meta_extra = {"mlflow_run_id": run_id, "tracking_uri": uri, "run_name": cfg.run_name}
    evaluation: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}

    def evaluate() -> dict[str, Any] | None:
        """Rank 0 evaluates; every rank then learns whether that hit bad input (collective)."""
        result, error = None, None
        if rank == 0:
            try:
                result = loop.evaluate()
            except PmvisError as e:
                error = e
        agree_on_error(error, device)
        return result

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        nonlocal last_checkpoint
        name = checkpoint_dir_name(loop.iteration)
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix=temp_checkpoint_prefix(os.getpid())) as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_dir(loop, tmp, meta_extra)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        last_checkpoint = f"{run_dir}/{name}"

    try:
        if start >= cfg.iterations:  # a finished run started again: evaluate, report, done
            evaluation = evaluate()
            if rank == 0:
                mlf.log(_eval_metrics(evaluation), step=start)
            ray.train.report({"iteration": start, **_eval_metrics(evaluation)})
            return _return_value(rank, "finished", loop, start, evaluation, last_checkpoint, run_id, None, metrics)
        progress = ProgressPrinter(cfg.iterations, cfg.print_every, run_name=cfg.run_name, enabled=rank == 0)
        eval_hook = EvaluateHook(cfg.eval_every, evaluate)
        hooks: list[Hook] = [eval_hook, LogHook(cfg.log_every, mlf, rank), ReportHook(cfg.checkpoint_every, report)]
        window_start, window_n = time.perf_counter(), 0
        t_first: float | None = None
        steady: float | None = None
        for it in range(start, cfg.iterations):
            try:  # bad input (a missing or corrupt frame) on any rank stops every rank here, together
                _maybe_fail(cfg.debug, it, rank)
                batch, input_error = loop.sampler.get(it, prefetch_next=it + 1 < cfg.iterations), None
            except PmvisError as e:
                batch, input_error = None, e
            agree_on_error(input_error, device)
            try:
                terms = loop.step(it, batch=batch)
            except NonFiniteLoss as e:
                logger.error("rank %d: %s; last good checkpoint: %s", rank, e, last_checkpoint)
                if rank == 0:
                    mlf.tag("pmvis.status", f"non-finite loss at iteration {it}")
                return _return_value(rank, "nonfinite", loop, start, None, last_checkpoint, run_id,
                                     {"iteration": e.iteration, "terms": e.terms, "grad_norm": e.grad_norm,
                                      "message": str(e)}, metrics)
            done = it + 1
            progress.step_done(done, terms, loop.lrs)
            window_n += 1
            now = time.perf_counter()
            if t_first is None:  # steady-state speed: from the end of this invocation's first step
                t_first = now
            elif done == cfg.iterations:
                steady = (done - start - 1) / max(now - t_first, 1e-9)
            step = StepEnd(done=done, final=done == cfg.iterations)
            step.evaluated = eval_hook.due(step)
            due = [h for h in hooks if h.due(step)]
            if not due:
                continue
            it_per_s = window_n / max(now - window_start, 1e-9)  # since the last log / report
            window_start, window_n = now, 0
            step.metrics = {k: float(v) for k, v in terms.items()}
            step.metrics.update(loop.lrs())
            step.metrics.update({"it_per_s": it_per_s, "iteration": done})
            for hook in due:
                hook(step)
            metrics, evaluation = step.metrics, eval_hook.last
            pause = time.perf_counter() - now  # logging, evaluation, checkpoint: not part of it/s
            window_start += pause
            t_first += pause
            progress.resume()
        return _return_value(rank, "finished", loop, start, evaluation, last_checkpoint, run_id, None, metrics,
                             steady_it_per_s=steady)
    except WorkerInputError as e:
        logger.error("rank %d: %s", rank, e)
        return _error_value(rank, str(e), run_id, last_checkpoint=last_checkpoint)
    finally:
        loop.close()


def _resume_checkpoint(run_dir: str) -> Any:
    """The ``ray.train.Checkpoint`` to resume from: for a local run the newest complete checkpoint
    directory (:func:`latest_checkpoint`: Ray's snapshot may be missing after an interrupted run,
    or name a copy cut short), for remote storage the one Ray Train hands in."""
    if is_remote(run_dir):
        return ray.train.get_checkpoint()
    latest = latest_checkpoint(run_dir)
    return None if latest is None else ray.train.Checkpoint.from_directory(latest)


def _error_value(rank: int, message: str, run_id: str | None, **extra: Any) -> dict[str, Any] | None:
    """Rank 0's return value for a bad input found in the workers (:class:`WorkerInputError`)."""
    if rank != 0:
        return None
    return {"status": "error", "failure": {"message": message}, "mlflow_run_id": run_id, **extra}


def _return_value(rank: int, status: str, loop: TrainingLoop, start: int, evaluation: Any, last_checkpoint: str | None,
                  run_id: str | None, failure: Any, metrics: Mapping[str, Any], **extra: Any) -> dict[str, Any] | None:
    if rank != 0:
        return None
    return {"status": status, "iteration": loop.iteration, "start_iteration": start, "evaluation": evaluation,
            "last_checkpoint": last_checkpoint, "mlflow_run_id": run_id, "failure": failure,
            "metrics": dict(metrics), **extra}

