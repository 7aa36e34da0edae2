"""One worker's training state and step: model, AdamW groups, step schedule, criterion, clip
sampler, mixed precision, and the non-finite guard.

Used by the Ray Train worker (:mod:`pmvis.platform.train.worker`) and as a bare single-process
loop (tests, benchmarks): ``wrap`` turns the model into its DDP form (``prepare_model``).

Non-finite loss: every rank agrees (an all-reduce of the loss, and the DDP-reduced gradient norm)
and stops before the optimizer step (:class:`NonFiniteLoss`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.models.vis import VISCriterion, build_model
from pmvis.models.vis.checkpoint import check_compatible, initial_weights, save_checkpoint
from pmvis.models.vis.config import ModelConfig
from pmvis.models.vis.inference import InferenceConfig
from pmvis.platform.data.clips import build_sampler
from pmvis.platform.data.vis_data import load_training_data
from pmvis.platform.evaluation import evaluate_ytvis
from pmvis.platform.predict import predict_dataset
from pmvis.platform.train.config import TrainConfig

logger = logging.getLogger(__name__)

def build_optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW with the backbone at ``lr × backbone_lr_mult``, parameters named by a ``lr_mults``
    prefix at ``lr × mult`` (longest prefix first) and the rest at ``lr``."""
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
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)


def restore_training_state(state: Mapping[str, Any], model: Any, optimizer: Any, scheduler: Any,
                           model_cfg: ModelConfig) -> int:
    """Load a checkpoint dict (:func:`read_checkpoint`) into model, optimizer and scheduler; returns
    the number of completed iterations. A checkpoint of another architecture is a PmvisError."""
    check_compatible(dict(state), model_cfg)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise PmvisError(f"{state.get('path')}: checkpoint has no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


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
            pseudo_divide_by_quality=cfg.loss.pseudo_divide_by_quality,
            pseudo_quality_floor=cfg.loss.pseudo_quality_floor,
            supervise_all_frames=cfg.loss.loss_frames == "all")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.core = build_model(cfg.model).to(self.device)
        self.core.backbone.freeze_stages(cfg.freeze_at)
        self.core.train()
        self.wrap = wrap
        self.model = self.core
        self.optimizer = build_optimizer(self.core, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.criterion = VISCriterion(cfg.loss)
        self.iteration = 0
        on_gpu = self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.amp_dtype) if (cfg.amp and on_gpu) else None
        # float16 needs loss scaling; bfloat16 and float32 do not (the scaler is then a pass-through)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.params = [p for p in self.core.parameters() if p.requires_grad]

    def restore(self, state: Mapping[str, Any]) -> int:
        self.iteration = restore_training_state(state, self.core, self.optimizer, self.scheduler, self.cfg.model)
        if self.scaler.is_enabled() and (state.get("extra") or {}).get("grad_scaler"):
            self.scaler.load_state_dict(state["extra"]["grad_scaler"])
        return self.iteration

    def init_weights(self, state: Mapping[str, Any]) -> None:
        """Start from another run's weights (not its optimizer or iteration count); from a checkpoint
        with another class count, all but the class heads (:func:`initial_weights`)."""
        weights, skipped = initial_weights(dict(state), self.cfg.model)
        missing, unexpected = self.core.load_state_dict(weights, strict=False)
        if unexpected or set(missing) != set(skipped):  # only the class heads initial_weights left out
            raise PmvisError(f"{state.get('path')}: weights do not fit (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
        if skipped:
            logger.info("init_from %s: another class count; the class heads start fresh", state.get("path"))

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
        cfg = self.cfg
        if batch is None:
            batch = self.sampler.get(iteration, prefetch_next=prefetch_next)
        images, padding = batch.model_inputs(self.device)
        targets = batch.targets(self.device, bottom_pixels=cfg.loss.bottom_pixels_removed)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = self.model(images, padding)
        if self.amp_dtype is not None:
            output = _float_output(output)
        terms = self.criterion(output, targets, self.core.mask_logits, iteration=iteration)
        loss = terms["loss"]
        if cfg.debug.nan_at_iteration == iteration:
            loss = loss * float("nan")
            terms["loss"] = loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        check = loss.detach().float().reshape(1).clone()  # a copy: all_reduce works in place
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(check)  # a non-finite loss on any rank makes the sum non-finite everywhere
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grads_ok = self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))  # fp16: the scaler skips inf steps
        if not (bool(torch.isfinite(check)) and grads_ok):
            raise NonFiniteLoss(iteration, {k: float(v.detach()) for k, v in terms.items()}, float(grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration = iteration + 1
        out = {k: v.detach() for k, v in terms.items()}
        out["grad_norm"] = grad_norm.detach()
        return out

    def checkpoint_extra(self, **extra: Any) -> dict[str, Any]:
        out = {"category_ids": list(self.data.category_ids),
               "categories": {str(c): self.data.dataset.categories[c] for c in self.data.category_ids},
               "val_videos": list(self.data.val_videos), "train_config": self.cfg.model_dump(mode="json"), **extra}
        if self.scaler.is_enabled():
            out["grad_scaler"] = self.scaler.state_dict()
        return out

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
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
    changes = {f.name: getattr(output, f.name).float() for f in dataclasses.fields(output)
               if isinstance(getattr(output, f.name), torch.Tensor) and getattr(output, f.name).is_floating_point()}
    return dataclasses.replace(output, **changes)


def inference_config(knobs: Mapping[str, Any]) -> InferenceConfig:
    """The held-out evaluation's inference knobs (``TrainConfig.inference``), validated."""
    return build_config(InferenceConfig, knobs, source="inference")


def evaluate_model(model: Any, gt: Any, inference_knobs: Mapping[str, Any],
                   category_ids: list[int]) -> dict[str, Any]:
    """Predict ``gt``'s videos (:func:`pmvis.platform.predict.predict_dataset`) and score them
    (:func:`evaluate_ytvis`): the evaluation JSON."""
    with torch.no_grad():
        results = predict_dataset(model, gt, inference_config(inference_knobs), category_ids=category_ids,
                                  progress=False)
    return evaluate_ytvis(gt, results).to_json()
