"""Distributed training of the VIS model (IDOL-BoxInst / PM-VIS / + TK-Loss) on Ray Train (V2).

Driver: :func:`run_training` checks the config and data, opens (or, on resume, re-opens) the MLflow
run, writes the effective config next to the run and launches a ``TorchTrainer`` with
``ScalingConfig(num_workers, use_gpu)`` and ``RunConfig(name=run_name, storage_path=...)``.
Workers: :func:`train_loop_per_worker` builds the model (DDP through ``ray.train.torch.prepare_model``:
gloo on CPU, NCCL on GPU — TorchTrainer's default TorchConfig backend), AdamW (backbone group at
``lr × backbone_lr_mult``), a step schedule, and trains on clip batches of its own shard of videos.

Resume (Ray Train V2): a run is the directory ``storage_path/run_name``, locked while it runs
(:func:`run_lock`: a second run of the same name is refused up front). The workers resume from the
newest *complete* ``checkpoint_*`` directory there (:func:`latest_checkpoint`), not from Ray's
checkpoint manager snapshot, which Ctrl-C can leave unwritten and which may name a copy cut short —
after a worker failure (``FailureConfig(max_failures)``: the whole worker group restarts) and when
the user simply runs the same command again after a crash or Ctrl-C (the CLI then says where the
rerun resumes and exits 130). Remote storage (``s3://``…) is not scanned: there Ray's record
(``ray.train.get_checkpoint()``) is used. The checkpoint holds the model, optimizer and scheduler state
and the iteration count, so training continues at the next iteration with the same batches (the
sampler is a pure function of seed, rank and iteration). The MLflow run id is stored in the
checkpoint (``extra``) and in a small ``pmvis_meta.json`` beside it, and the driver re-opens that
run: a resumed run keeps logging into the same MLflow run. V2 caveat: the controller takes in a
worker's reports when it polls it (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s) and a
report still queued in a worker that dies is lost, so a checkpoint reported within ~2 s of a crash
may not be registered; the restart then resumes from the one before (the iteration count stays
right: it is read from the checkpoint).

Checkpoints: every ``checkpoint_every`` iterations and at the end, rank 0 writes ``checkpoint.pt``
(:func:`pmvis.models.vis.checkpoint.save_checkpoint`) and then its record ``pmvis_meta.json`` with
the file's size and SHA-256 (:func:`write_checkpoint_dir`) into a temporary directory and passes it
to ``ray.train.report``, which copies it into storage; that copy is not atomic (a full disk leaves
a truncated file), so a checkpoint is only used after :func:`verify_checkpoint` — one that fails is
skipped with a warning for the one before. Temporary directories of killed workers are removed
when a worker starts; the other ranks report the same metrics with ``checkpoint=None`` (V2: one
rank's checkpoint is enough; every rank must call report the same number of times). Directories are
named ``checkpoint_<iteration>``; ``keep_checkpoints`` most recent are kept.

Non-finite loss: every rank agrees (an all-reduce of the loss, and the DDP-reduced gradient norm)
and stops before the optimizer step; :func:`run_training` raises a PmvisError naming the iteration,
the non-finite terms and the last good checkpoint. The error is returned, not raised in the workers,
so Ray does not burn ``max_failures`` retries on a deterministic divergence. A PmvisError in a
worker (a frame that cannot be read, …) is handled the same way: every rank learns of it through a
collective (:func:`agree_on_error`) and they all return it. :func:`preflight` checks what it can
(data files, every frame file, backbone weights, the resume checkpoint) before Ray starts.

MLflow (rank 0 and the driver only; DESIGN §6: no MLflowLoggerCallback on a Train V2 RunConfig):
params = the whole config flattened; metrics every ``log_every`` iterations = every loss term,
``lr``, ``lr_backbone``, ``it_per_s``; ``eval_*`` metrics; artifacts = ``config.yaml`` and the final
``evaluation.json``. Console: every ``print_every`` iterations rank 0 logs one progress line (ETA,
speed, main loss terms, lr; :mod:`pmvis.platform.progress`); Ray Train's own INFO chatter is kept
off the console (:mod:`pmvis.platform.ray_logs`).

Decisions (DESIGN §4.3/§4.4): AdamW lr 1e-4, backbone ×0.1, weight decay 1e-4 (Deformable DETR /
IDOL), gradient clipping of the whole model's L2 norm at 0.01 (IDOL's configs: CLIP_TYPE full_model,
CLIP_VALUE 0.01; Deformable DETR itself used 0.1 — set ``grad_clip``), PM-VIS schedule 50k
iterations with the step at 8k, global batch 4 (= ``batch_size × num_workers``), 2 sampled frames.
AMP (``amp``) only applies on GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

from pydantic import ConfigDict, Field, field_validator, model_validator

from pmvis.models.vis.config import LossConfig, ModelConfig
from pmvis.core.config import StrictConfig, build_config, dump_config
from pmvis.core.errors import PmvisError
from pmvis.platform.progress import ProgressPrinter
from pmvis.platform.data.vis_data import DataConfig

logger = logging.getLogger(__name__)

CHECKPOINT_META = "pmvis_meta.json"
CONFIG_FILENAME = "config.yaml"
EVALUATION_FILENAME = "evaluation.json"
CHECKPOINT_PREFIX = "checkpoint_"  # checkpoint directories: checkpoint_<iteration, 8 digits>
RUN_LOCK_FILENAME = ".pmvis.lock"  # in the run directory, flock-ed while a run is alive
TEMP_CHECKPOINT_PREFIX = "pmvis-ckpt-"  # a worker's checkpoint before Ray copies it: pmvis-ckpt-<pid>-*
MAX_ERROR_MESSAGE_BYTES = 4096  # a worker's PmvisError message shared with the other ranks, cut to this
MAX_LISTED_PROBLEMS = 5  # an error message names this many missing files, then counts the rest
TINY_NUM_CLASSES = 5  # the synthetic dataset's categories (pmvis.platform.data.synthetic.CATEGORIES)


class DebugConfig(StrictConfig):
    """Fault injection for tests and drills; leave unset in real runs."""

    # Kill (os._exit) or raise in the worker of world rank ``fail_rank`` when it reaches this iteration.
    fail_at_iteration: int | None = None
    fail_rank: int = 0
    fail_mode: Literal["exit", "raise", "error"] = "exit"  # error: a PmvisError (a deterministic bad input)
    # Fail only while this file does not exist (it is created just before failing): fail once.
    fail_marker: str | None = None
    # Sleep this long before failing. Ray Train V2's controller takes in a worker's reports when it
    # polls it (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a report still queued in a worker that
    # dies is lost, so a checkpoint reported just before a crash may not be the one resumed from.
    fail_delay_s: float = Field(0.0, ge=0.0)
    # Make the loss NaN at this iteration (tests the non-finite guard).
    nan_at_iteration: int | None = None


class TrainConfig(StrictConfig):
    """Every knob of a training run. Defaults: PM-VIS / IDOL R50 (DESIGN §4.3, §4.4); see :meth:`tiny`."""

    # inf / nan in a float knob (lr: .inf) would only surface as a diverged run, iterations later
    model_config = ConfigDict(allow_inf_nan=False)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig
    iterations: int = Field(50_000, ge=1)  # PM-VIS authors' code
    batch_size: int = Field(4, ge=1)  # clips per worker; global batch = batch_size × num_workers (PM-VIS: 4)
    lr: float = Field(1e-4, gt=0)
    backbone_lr_mult: float = Field(0.1, ge=0)
    # Parameter-name prefix -> lr multiplier (e.g. {"mask_branch.": 10}): a group at lr × mult, ahead
    # of the backbone rule (the longest matching prefix wins). Fine-tuning a pretrained detector's mask
    # head faster than its detector; empty: every non-backbone parameter at lr.
    lr_mults: dict[str, float] = Field(default_factory=dict)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(0.01, ge=0)  # max L2 norm of all gradients together (IDOL: 0.01); 0 = off
    lr_steps: list[int] = Field(default_factory=lambda: [8000])  # iterations where lr ×= lr_gamma
    lr_gamma: float = Field(0.1, gt=0)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    eval_every: int = Field(0, ge=0)  # evaluate the held-out videos every N iterations; 0 = only at the end
    log_every: int = Field(20, ge=1)  # MLflow metrics every N iterations
    print_every: int = Field(20, ge=0)  # a progress line on the console every N iterations (rank 0); 0 = none
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)  # also torch's thread count on a CPU worker
    use_gpu: bool = False  # one GPU per worker; never on by default (a GPU request on a CPU cluster waits forever)
    amp: bool = True  # mixed precision forward on GPU (ignored on CPU)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    find_unused_parameters: bool = False  # DDP option; every IDOL parameter is used by the losses
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    run_name: str | None = None  # None: pmvis-train-<timestamp>; the same name resumes
    storage_path: str = "./pmvis-runs"
    experiment: str = "pmvis-train"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or a local sqlite store
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seeds
    init_from: str | None = None  # start from these weights (e.g. box-only → PM-VIS); ignored on resume
    # Knobs of pmvis.models.vis.inference's config for the held-out evaluation (validated there).
    inference: dict[str, Any] = Field(default_factory=dict)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @field_validator("lr_mults")
    @classmethod
    def _check_lr_mults(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if not k or not math.isfinite(m) or m < 0}
        if bad:
            raise ValueError(f"lr_mults needs non-empty parameter-name prefixes and finite multipliers ≥ 0, got {bad}")
        return v

    @field_validator("run_name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or "\\" in v or v in (".", "..")
                              or not v.isprintable()):  # NUL, newline, …: not a usable directory name
            raise ValueError(f"run_name must be a plain directory name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.loss.mode == "pmvis" and self.data.pseudo_annotations is None:
            raise ValueError("loss.mode 'pmvis' needs data.pseudo_annotations (the fused file of `pmvis fuse`)")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps must be increasing positive iterations, got {self.lr_steps}")
        return self

    @classmethod
    def tiny(cls, data_dir: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        """A CPU-sized run for tests and the demo: the tiny model on the synthetic data at its native
        size (64–128 px), lr 1e-3 with a full-rate backbone (it trains from scratch), a few iterations.
        ``overrides`` are merged into the values (nested dicts key by key)."""
        values: dict[str, Any] = {
            "model": ModelConfig.tiny(num_classes=TINY_NUM_CLASSES).model_dump(mode="json"),
            "loss": {"pairwise_warmup_iters": 50, "tk_warmup_calls": 100},  # TK: 50 iterations × 2 layers
            "data": {"data_dir": str(data_dir), "short_side": None, "max_size": None, "val_fraction": 0.34},
            "iterations": 20, "batch_size": 2, "lr": 1e-3, "backbone_lr_mult": 1.0, "lr_steps": [15],
            "checkpoint_every": 10, "log_every": 5, "keep_checkpoints": 2,
            "inference": {"test_short_side": None, "test_max_size": None},
        }
        return build_config(cls, merge_values(values, overrides), source="TrainConfig.tiny")


def merge_values(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``base`` (dicts key by key, anything else replaced)."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_values(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(values: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``set_dotted(v, "model.hidden_dim", 64)``: set a nested key in place (creating dicts)."""
    parts = key.split(".")
    if not all(parts):
        raise PmvisError(f"--set {key}: not a dotted config key")
    node = values
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise PmvisError(f"--set {key}: {p!r} is not a section of the config")
        node = child
    node[parts[-1]] = value
    return values


# ----------------------------------------------------------------------------- worker-side pieces


def build_optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW with the backbone at ``lr × backbone_lr_mult``, parameters named by a ``lr_mults``
    prefix at ``lr × mult`` (longest prefix first) and the rest at ``lr``."""
    import torch

    rules = sorted(cfg.lr_mults.items(), key=lambda kv: -len(kv[0]))
    params: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((k for k, _ in rules if name.startswith(k)), None)
        group = prefix if prefix is not None else ("backbone" if name.startswith("backbone.") else "main")
        params.setdefault(group, []).append(p)
    unused = [k for k, _ in rules if k not in params]
    if unused:  # a typo would silently train at the main lr
        raise PmvisError(f"lr_mults: no trainable parameter name starts with {unused}")
    mults = {"main": 1.0, "backbone": cfg.backbone_lr_mult, **cfg.lr_mults}
    # named after the prefix without its dot: the metric lr_mask_branch
    groups = [{"params": ps, "lr": cfg.lr * mults[g], "name": g.rstrip(".")} for g, ps in params.items()]
    groups.sort(key=lambda g: g["name"] != "main")  # group 0 is the main lr (progress lines, schedules)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: Any, cfg: TrainConfig) -> Any:
    import torch

    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)


def restore_training_state(state: Mapping[str, Any], model: Any, optimizer: Any, scheduler: Any,
                           model_cfg: ModelConfig) -> int:
    """Load a checkpoint dict (:func:`read_checkpoint`) into model, optimizer and scheduler; returns
    the number of completed iterations. A checkpoint of another architecture is a PmvisError."""
    from pmvis.models.vis.checkpoint import check_compatible

    check_compatible(dict(state), model_cfg)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise PmvisError(f"{state.get('path')}: checkpoint has no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


class WorkerInputError(Exception):
    """A PmvisError on one rank, made known to every rank (:func:`agree_on_error`): they all stop
    and return it, so Ray does not restart the worker group for a deterministic bad input."""


def agree_on_error(error: PmvisError | None, device: Any = "cpu") -> None:
    """Collective: raise :class:`WorkerInputError` on every rank when any rank passes an error.

    A rank that raised alone would leave the others blocked in a collective, and a raised
    exception makes Ray retry the whole group ``max_failures`` times on the same bad input."""
    import torch
    import torch.distributed as dist

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


class NonFiniteLoss(Exception):
    def __init__(self, iteration: int, terms: dict[str, float], grad_norm: float | None):
        self.iteration, self.terms, self.grad_norm = iteration, terms, grad_norm
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        super().__init__(f"non-finite loss at iteration {iteration} (terms {bad or terms}"
                         + (f", gradient norm {grad_norm}" if grad_norm is not None else "") + ")")


class TrainingLoop:
    """Model, optimizer, schedule, criterion and clip sampler of one worker, and one training step.

    Used by :func:`train_loop_per_worker` (under Ray Train) and as a bare single-process loop
    (tests, benchmark): ``wrap`` turns the model into its DDP form (``prepare_model``)."""

    def __init__(self, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, device: Any = "cpu",
                 wrap: Callable[[Any], Any] | None = None, data: Any = None) -> None:
        import torch

        from pmvis.models.vis import VISCriterion, build_model
        from pmvis.platform.data.vis_data import build_sampler, load_training_data

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        need_gt, need_pseudo = cfg.loss.mode == "full", cfg.loss.mode == "pmvis"
        self.data = data if data is not None else load_training_data(
            cfg.data, num_classes=cfg.model.num_classes, need_gt_masks=need_gt, need_pseudo=need_pseudo,
            load_eval=rank == 0)
        self.sampler = build_sampler(
            self.data, cfg.data, batch_size=cfg.batch_size, stride=cfg.model.mask_stride, seed=cfg.seed, rank=rank,
            world_size=world_size, need_gt_masks=need_gt, need_pseudo=need_pseudo,
            pseudo_quality_weighting=cfg.loss.pseudo_quality_weighting,
            supervise_all_frames=cfg.loss.loss_frames == "all")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.core = build_model(cfg.model).to(self.device)
        self.core.train()
        self.wrap = wrap
        self.model = self.core
        self.optimizer = build_optimizer(self.core, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.criterion = VISCriterion(cfg.loss)
        self.iteration = 0
        on_gpu = self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.amp_dtype) if (cfg.amp and on_gpu) else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.params = [p for p in self.core.parameters() if p.requires_grad]

    def restore(self, state: Mapping[str, Any]) -> int:
        self.iteration = restore_training_state(state, self.core, self.optimizer, self.scheduler, self.cfg.model)
        if self.scaler is not None and (state.get("extra") or {}).get("grad_scaler"):
            self.scaler.load_state_dict(state["extra"]["grad_scaler"])
        return self.iteration

    def init_weights(self, state: Mapping[str, Any]) -> None:
        """Start from another run's weights (not its optimizer or iteration count)."""
        from pmvis.models.vis.checkpoint import check_compatible

        check_compatible(dict(state), self.cfg.model)
        self.core.load_state_dict(state["model"])

    def distribute(self) -> None:
        """Wrap the model for data-parallel training (after any weights were loaded)."""
        if self.wrap is not None:
            self.model = self.wrap(self.core)

    def lrs(self) -> dict[str, float]:
        return {("lr" if g.get("name") == "main" else f"lr_{g.get('name')}"): float(g["lr"])
                for g in self.optimizer.param_groups}

    def step(self, iteration: int, *, prefetch_next: bool = True, batch: Any = None) -> dict[str, Any]:
        """One optimisation step on the batch of ``iteration`` (``batch``: already fetched);
        returns the (detached) loss terms.

        Raises :class:`NonFiniteLoss` (on every rank alike) before touching the weights."""
        import torch
        import torch.distributed as dist

        cfg = self.cfg
        if batch is None:
            batch = self.sampler.get(iteration, prefetch_next=prefetch_next)
        images, padding = batch.model_inputs(self.device)
        targets = batch.targets(self.device, bottom_pixels=cfg.loss.bottom_pixels_removed)
        if self.amp_dtype is not None:
            with torch.autocast("cuda", dtype=self.amp_dtype):
                output = self.model(images, padding)
            output = _float_output(output)
        else:
            output = self.model(images, padding)
        terms = self.criterion(output, targets, self.core.mask_logits, iteration=iteration)
        loss = terms["loss"]
        if cfg.debug.nan_at_iteration == iteration:
            loss = loss * float("nan")
            terms["loss"] = loss
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        check = loss.detach().float().reshape(1).clone()  # a copy: all_reduce works in place
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(check)  # a non-finite loss on any rank makes the sum non-finite everywhere
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grads_ok = self.scaler is not None or bool(torch.isfinite(grad_norm))  # fp16: the scaler skips inf steps
        if not (bool(torch.isfinite(check)) and grads_ok):
            raise NonFiniteLoss(iteration, {k: float(v.detach()) for k, v in terms.items()}, float(grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.iteration = iteration + 1
        out = {k: v.detach() for k, v in terms.items()}
        out["grad_norm"] = grad_norm.detach()
        return out

    def checkpoint_extra(self, **extra: Any) -> dict[str, Any]:
        out = {"category_ids": list(self.data.category_ids),
               "categories": {str(c): self.data.dataset.categories[c] for c in self.data.category_ids},
               "val_videos": list(self.data.val_videos), "train_config": self.cfg.model_dump(mode="json"), **extra}
        if self.scaler is not None:
            out["grad_scaler"] = self.scaler.state_dict()
        return out

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        from pmvis.models.vis.checkpoint import save_checkpoint

        return save_checkpoint(path, self.core, self.cfg.model, iteration=self.iteration, optimizer=self.optimizer,
                               scheduler=self.scheduler, extra=self.checkpoint_extra(**extra))

    def evaluate(self) -> dict[str, Any] | None:
        """AP/AR of the held-out videos (:func:`evaluate_model`); None when nothing is held out."""
        if self.data.eval_gt is None:
            return None
        was_training = self.core.training
        self.core.eval()
        try:
            return evaluate_model(self.core, self.data.eval_gt, self.cfg.inference, self.data.category_ids)
        finally:
            self.core.train(was_training)

    def close(self) -> None:
        self.sampler.close()


def _float_output(output: Any) -> Any:
    """An AMP forward's VISOutput with float32 tensors (the losses run in float32)."""
    import dataclasses

    import torch

    changes = {f.name: getattr(output, f.name).float() for f in dataclasses.fields(output)
               if isinstance(getattr(output, f.name), torch.Tensor) and getattr(output, f.name).is_floating_point()}
    return dataclasses.replace(output, **changes)


def _inference_module() -> Any:
    """The inference module (imported lazily; None while it does not exist)."""
    import importlib

    name = "pmvis.models.vis.inference"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def _inference_config(knobs: Mapping[str, Any]) -> Any:
    from pmvis.core.config import build_config

    inference = _inference_module()
    if inference is None:
        return None
    return build_config(inference.InferenceConfig, knobs, source="inference")


def evaluate_model(model: Any, gt: Any, inference_knobs: Mapping[str, Any],
                   category_ids: list[int]) -> dict[str, Any] | None:
    """Predict ``gt``'s videos with :mod:`pmvis.models.vis.inference` and score them
    (:func:`evaluate_ytvis`); None, with a warning, when that module is not available."""
    import torch

    from pmvis.platform.evaluation import evaluate_ytvis

    inference = _inference_module()
    if inference is None:
        logger.warning("pmvis.models.vis.inference is not available: skipping the held-out evaluation")
        return None
    infer_cfg = _inference_config(inference_knobs)
    with torch.no_grad():
        results = inference.predict_dataset(model, gt, infer_cfg, category_ids=category_ids, progress=False)
    return evaluate_ytvis(gt, results).to_json()


class _MlflowLogger:
    """Metrics from rank 0 into the run the driver opened (a no-op without a run id)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None]
        for i in range(0, len(items), 500):
            try:
                self.client.log_batch(self.run_id, metrics=items[i:i + 500])
            except Exception as e:  # tracking must never kill a training run
                logger.warning("MLflow logging failed at iteration %d: %s", step, e)
                return

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            try:
                self.client.set_tag(self.run_id, key, value)
            except Exception as e:
                logger.warning("MLflow tag failed: %s", e)


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


def _temp_checkpoint_prefix(pid: int) -> str:
    return f"{TEMP_CHECKPOINT_PREFIX}{pid}-"


def remove_stale_temp_checkpoints(temp_dir: str | os.PathLike | None = None) -> list[Path]:
    """Delete the temporary checkpoint directories of workers that are gone (a worker killed while
    writing one, e.g. by Ctrl-C, cannot clean up after itself); returns what was removed."""
    import shutil

    removed = []
    for d in Path(temp_dir or tempfile.gettempdir()).glob(f"{TEMP_CHECKPOINT_PREFIX}*-*"):
        pid = d.name[len(TEMP_CHECKPOINT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def checkpoint_dir_name(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:08d}"


def train_loop_per_worker(config: dict) -> dict[str, Any] | None:
    """Ray Train's per-worker function. ``config``: ``train_config`` (the TrainConfig as JSON),
    ``run_dir``, ``mlflow_run_id``, ``tracking_uri`` (set by :func:`run_training`)."""
    import ray.train
    import ray.train.torch
    import torch

    from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME, read_checkpoint
    from pmvis.platform.ray_logs import install_train_worker_log_filters

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
    mlf = _MlflowLogger(uri, run_id) if rank == 0 else _MlflowLogger(None, None)
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
        with tempfile.TemporaryDirectory(prefix=_temp_checkpoint_prefix(os.getpid())) as tmp:
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
            final = done == cfg.iterations
            log_due = done % cfg.log_every == 0 or final
            eval_due = final or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
            ckpt_due = final or done % cfg.checkpoint_every == 0
            if not (log_due or eval_due or ckpt_due):
                continue
            it_per_s = window_n / max(now - window_start, 1e-9)  # since the last log / report
            window_start, window_n = now, 0
            metrics = {k: float(v) for k, v in terms.items()}
            metrics.update(loop.lrs())
            metrics.update({"it_per_s": it_per_s, "iteration": done})
            if eval_due:
                evaluation = evaluate()
                metrics.update(_eval_metrics(evaluation))
            if rank == 0 and (log_due or eval_due):
                mlf.log(metrics, step=done)
            if ckpt_due or eval_due:
                report(metrics, with_checkpoint=ckpt_due)
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
    import ray.train

    if _is_remote(run_dir):
        return ray.train.get_checkpoint()
    latest = latest_checkpoint(run_dir)
    return None if latest is None else ray.train.Checkpoint.from_directory(latest)


def _error_value(rank: int, message: str, run_id: str | None, **extra: Any) -> dict[str, Any] | None:
    """Rank 0's return value for a bad input found in the workers (:class:`WorkerInputError`)."""
    if rank != 0:
        return None
    return {"status": "error", "failure": {"message": message}, "mlflow_run_id": run_id, **extra}


def write_checkpoint_dir(loop: TrainingLoop, directory: str | os.PathLike, extra: Mapping[str, Any]) -> Path:
    """``checkpoint.pt`` and then its record ``pmvis_meta.json`` (iteration, model config, MLflow
    run, and the size and SHA-256 of checkpoint.pt): the record lets a reader tell a complete copy
    in storage from one cut short (:func:`verify_checkpoint`)."""
    from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME, config_fingerprint, file_record
    from pmvis.core.io import write_json_atomic

    directory = Path(directory)
    loop.save(directory / CHECKPOINT_FILENAME, **extra)
    files = {CHECKPOINT_FILENAME: file_record(directory / CHECKPOINT_FILENAME)}
    record = {"iteration": loop.iteration, "fingerprint": config_fingerprint(loop.cfg.model),
              "model_config": loop.cfg.model.model_dump(mode="json"), "files": files, **extra}
    write_json_atomic(directory / CHECKPOINT_META, record, indent=1)
    return directory


def _return_value(rank: int, status: str, loop: TrainingLoop, start: int, evaluation: Any, last_checkpoint: str | None,
                  run_id: str | None, failure: Any, metrics: Mapping[str, Any], **extra: Any) -> dict[str, Any] | None:
    if rank != 0:
        return None
    return {"status": status, "iteration": loop.iteration, "start_iteration": start, "evaluation": evaluation,
            "last_checkpoint": last_checkpoint, "mlflow_run_id": run_id, "failure": failure,
            "metrics": dict(metrics), **extra}


# ----------------------------------------------------------------------------- driver


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


def _is_remote(path: str) -> bool:
    return "://" in path


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths (workers run elsewhere), a run name, a tracking URI."""
    from pmvis.platform.experiments import default_tracking_uri

    def absolute(p: str | None) -> str | None:
        return None if p is None or _is_remote(p) else str(Path(p).expanduser().resolve())

    data = cfg.data.model_copy(update={"data_dir": absolute(cfg.data.data_dir)})
    debug = cfg.debug.model_copy(update={"fail_marker": absolute(cfg.debug.fail_marker)})
    model = cfg.model.model_copy(update={"backbone_weights": absolute(cfg.model.backbone_weights)})
    name = cfg.run_name or f"pmvis-train-{datetime.now():%Y%m%d-%H%M%S}"
    return cfg.model_copy(update={
        "model": model, "data": data, "debug": debug, "run_name": name,
        "storage_path": absolute(cfg.storage_path) or cfg.storage_path,
        "init_from": absolute(cfg.init_from), "tracking_uri": cfg.tracking_uri or default_tracking_uri()})


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """A local run's ``checkpoint_<iteration>`` directories, newest first."""
    found = []
    for d in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = d.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and d.is_dir():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint of a run (None: no run / no checkpoint).

    A local run is read from its ``checkpoint_*`` directories, not from Ray's snapshot file: the
    snapshot may be missing (an interrupted run) or name a checkpoint whose copy into storage was
    cut short. A checkpoint that fails :func:`verify_checkpoint` is skipped with a warning; when
    there are checkpoints but none is complete, that is a PmvisError (never silently start over)."""
    run_dir = str(run_dir)
    if _is_remote(run_dir):
        return _ray_latest_checkpoint(run_dir)
    problems = []
    for d in checkpoint_dirs(run_dir):
        try:
            verify_checkpoint(d)
            return str(d)
        except PmvisError as e:
            logger.warning("skipping incomplete checkpoint %s: %s", d, e)
            problems.append(str(e))
    if problems:
        raise PmvisError(f"{run_dir}: no complete checkpoint to resume from ({'; '.join(problems[:3])}); "
                         "remove the broken checkpoint_* directories to start the run over")
    return None


def _ray_latest_checkpoint(run_dir: str) -> str | None:
    """The latest checkpoint Ray Train recorded (remote storage, which is not scanned)."""
    from ray.train import Result

    try:
        result = Result.from_path(run_dir)
    except Exception as e:  # noqa: BLE001 — a broken or foreign directory
        raise PmvisError(f"{run_dir}: cannot read the Ray Train run record: {e}") from None
    return None if result.checkpoint is None else str(result.checkpoint.path)


def read_checkpoint_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """``pmvis_meta.json`` of a checkpoint directory (falls back to reading checkpoint.pt); a
    corrupt record is a PmvisError naming the file."""
    from pmvis.models.vis.checkpoint import read_checkpoint

    meta = Path(checkpoint_dir) / CHECKPOINT_META
    if meta.is_file():
        try:
            out = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PmvisError(f"{meta}: not a readable checkpoint record ({type(e).__name__}: {e})") from None
        if not isinstance(out, dict):
            raise PmvisError(f"{meta}: expected a JSON object, got {type(out).__name__}")
        out["path"] = str(meta.parent)
        return out
    state = read_checkpoint(checkpoint_dir)
    return {"iteration": state["iteration"], "fingerprint": state.get("fingerprint"),
            "model_config": state.get("model_config"), "path": state["path"], **(state.get("extra") or {})}


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of a checkpoint whose files are whole: every file listed in its ``files`` has the
    recorded size and SHA-256. A record from before ``files`` existed: checkpoint.pt must load.
    Anything else is a PmvisError naming the file."""
    from pmvis.models.vis.checkpoint import file_record, read_checkpoint

    meta = read_checkpoint_meta(checkpoint_dir)
    files = meta.get("files")
    if files is None:
        read_checkpoint(checkpoint_dir)
        return meta
    where = Path(checkpoint_dir) / CHECKPOINT_META
    if not isinstance(files, dict) or not files:
        raise PmvisError(f"{where}: 'files' must map file names to their size and hash")
    for name, want in files.items():
        if Path(name).name != name or not isinstance(want, dict):
            raise PmvisError(f"{where}: bad 'files' entry {name!r}")
        f = Path(checkpoint_dir) / name
        if not f.is_file():
            raise PmvisError(f"{f}: missing (the checkpoint is incomplete)")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise PmvisError(f"{f}: {size} bytes, the record says {want.get('bytes')} (an incomplete copy)")
        if file_record(f)["sha256"] != want.get("sha256"):
            raise PmvisError(f"{f}: contents differ from the record's SHA-256 (corrupt or modified)")
    return meta


def _open_mlflow_run(cfg: TrainConfig, run_dir: str, resume_meta: Mapping[str, Any] | None) -> str:
    from mlflow.entities import Param, RunStatus
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pmvis.platform.experiments import ensure_experiment, flatten_params

    uri = cfg.tracking_uri
    client = MlflowClient(uri)
    params = flatten_params(cfg.model_dump(mode="json"))
    run_id = None
    if resume_meta and resume_meta.get("mlflow_run_id") and resume_meta.get("tracking_uri") == uri:
        try:
            run = client.get_run(resume_meta["mlflow_run_id"])
            run_id = run.info.run_id
        except MlflowException:
            logger.warning("MLflow run %s of the checkpoint is gone: starting a new one", resume_meta["mlflow_run_id"])
    if run_id is not None:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        logged = run.data.params
        new = {k: v for k, v in params.items() if k not in logged}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            client.set_tag(run_id, "pmvis.resume_changed_params", ", ".join(changed)[:5000])
        params = new
        client.set_tag(run_id, "pmvis.resumed_at", str(resume_meta.get("iteration")))
    else:
        experiment_id = ensure_experiment(cfg.experiment, uri)
        run = client.create_run(experiment_id, run_name=cfg.run_name,
                                tags={"pmvis.command": "train", "pmvis.run_dir": run_dir})
        run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow: at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


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
    import ray

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
    import fcntl
    import socket

    if _is_remote(run_dir):
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
    from pmvis.models.vis.checkpoint import check_compatible, read_checkpoint
    from pmvis.platform.data.vis_data import build_sampler, load_training_data

    cfg = resolve_config(cfg)
    need_gt, need_pseudo = cfg.loss.mode == "full", cfg.loss.mode == "pmvis"
    data = load_training_data(cfg.data, num_classes=cfg.model.num_classes, need_gt_masks=need_gt,
                              need_pseudo=need_pseudo, load_eval=False)
    check_frame_files(data.dataset, data.train_videos + data.val_videos)
    build_sampler(data, cfg.data, batch_size=cfg.batch_size, stride=cfg.model.mask_stride,
                world_size=cfg.num_workers, need_gt_masks=need_gt, need_pseudo=need_pseudo,
                supervise_all_frames=cfg.loss.loss_frames == "all")
    _inference_config(cfg.inference)  # a typo in the evaluation knobs fails now, not after training
    if cfg.model.backbone_weights is not None:
        check_backbone_weights(cfg.model)
    resume_meta = None
    latest = latest_checkpoint(run_dir_of(cfg))
    if latest is not None:
        resume_meta = read_checkpoint_meta(latest)
        check_compatible({**resume_meta, "path": latest}, cfg.model)
        check_compatible(read_checkpoint(latest), cfg.model)  # the weights file itself, as the workers load it
    elif cfg.init_from:
        check_compatible(read_checkpoint(cfg.init_from), cfg.model)
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
    from pmvis.models.vis.backbone import Backbone

    Backbone(model_cfg.backbone, [model_cfg.mask_stride, *model_cfg.backbone_strides],
             weights=model_cfg.backbone_weights, freeze_bn=False)


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


def _is_complete(checkpoint_dir: str) -> bool:
    try:
        verify_checkpoint(checkpoint_dir)
        return True
    except PmvisError as e:
        logger.warning("checkpoint %s is not complete in storage: %s", checkpoint_dir, e)
        return False


def _final_checkpoint(run_dir: str, result: Any) -> str | None:
    """The run's newest complete checkpoint: the one Ray reports may be a copy cut short, or (a
    finished run started again without Ray's snapshot) missing."""
    reported = str(result.checkpoint.path) if result.checkpoint is not None else None
    if _is_remote(run_dir):
        return reported
    latest = latest_checkpoint(run_dir)
    if reported is not None and (latest is None or Path(latest) != Path(reported)):
        logger.warning("the last reported checkpoint %s is not complete; using %s", reported, latest)
    return latest


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
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pmvis.core.io import write_json_atomic, write_text_atomic
    from pmvis.platform.ray_logs import quiet_ray_train, ray_train_logging_config

    cfg, resume_meta = preflight(cfg)
    run_dir = run_dir_of(cfg)
    check_resources(cfg)
    if resume_meta is not None:
        logger.info("resuming run %s from %s (iteration %s)", cfg.run_name, resume_meta["path"],
                    resume_meta.get("iteration"))
    run_id = _open_mlflow_run(cfg, run_dir, resume_meta)
    client = MlflowClient(cfg.tracking_uri)
    config_path = f"{run_dir}/{CONFIG_FILENAME}"
    try:
        if not _is_remote(run_dir):
            write_text_atomic(config_path, dump_config(cfg))
            client.log_artifact(run_id, config_path)
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
        if evaluation is not None and not _is_remote(run_dir):
            eval_path = f"{run_dir}/{EVALUATION_FILENAME}"
            write_json_atomic(eval_path, evaluation, indent=1)
            client.log_artifact(run_id, eval_path)
        checkpoint = _final_checkpoint(run_dir, result)
        best = checkpoint
        scored = [(m.get("eval_AP"), c) for c, m in (result.best_checkpoints or [])
                  if isinstance(m.get("eval_AP"), (int, float))]
        if scored:
            best = str(max(scored, key=lambda x: x[0])[1].path)
            if not _is_remote(run_dir) and not _is_complete(best):
                best = checkpoint
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    except BaseException as e:
        status = RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED
        try:
            client.set_terminated(run_id, status=RunStatus.to_string(status))
        except Exception:  # noqa: BLE001
            pass
        raise
    metrics = dict(result.metrics or {})
    return TrainResult(
        run_name=cfg.run_name, run_dir=run_dir, iteration=int(rv.get("iteration", metrics.get("iteration", 0))),
        start_iteration=int(rv.get("start_iteration", 0)), metrics=metrics, checkpoint=checkpoint,
        best_checkpoint=best, mlflow_run_id=run_id, tracking_uri=cfg.tracking_uri, evaluation=evaluation,
        config_path=config_path, steady_it_per_s=rv.get("steady_it_per_s"))
