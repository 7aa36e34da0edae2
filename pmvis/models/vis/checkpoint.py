"""Model checkpoints: one file format shared by training, resume, inference and the boxinst source.

A checkpoint is a plain dict of tensors and primitives saved with ``torch.save`` and always loaded
with ``torch.load(weights_only=True)``: no pickled code ever runs. It records the model config so a
checkpoint is only ever loaded into the architecture it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.core.io import atomic_path
from pmvis.models.torch_files import load_torch_file
from pmvis.models.vis import build_model
from pmvis.models.vis.config import ModelConfig

CHECKPOINT_FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1


# Architecture knobs added after checkpoints were first written, with the value every older
# checkpoint was trained with: left out of the fingerprint while at that value, so an older
# checkpoint (the shipped tiny start included) still fits a config that does not set them.
LATER_KNOBS: dict[str, Any] = {"rel_coords_scale": None, "mask_head": "fpn"}


def config_fingerprint(cfg: ModelConfig) -> str:
    """A short hash of every architecture knob; two configs with the same hash share weights."""
    values = cfg.model_dump(mode="json", exclude={"backbone_weights"})
    for key, old in LATER_KNOBS.items():
        if values.get(key) == old:
            values.pop(key)
    text = json.dumps(values, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    *,
    iteration: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically: a crash mid-save never leaves a truncated checkpoint behind."""
    state = {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model_cfg.model_dump(mode="json"),
        "fingerprint": config_fingerprint(model_cfg),
        "iteration": int(iteration),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely; a missing, corrupt or foreign file is a PmvisError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    state = load_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise PmvisError(f"{path}: not a pmvis checkpoint (format_version {FORMAT_VERSION} expected)")
    state["path"] = str(path)
    return state


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """Size and SHA-256 of a file: recorded when a checkpoint is written, compared before it is
    used, so a copy cut short (a full disk, a killed upload) is never loaded."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": Path(path).stat().st_size, "sha256": digest}


def checkpoint_model_config(state: dict[str, Any]) -> ModelConfig:
    """The validated model config a checkpoint (or its pmvis_meta.json) records; a missing or
    malformed record is a PmvisError naming the checkpoint."""
    where = state.get("path", "checkpoint")
    missing = [k for k in ("fingerprint", "model_config") if k not in state]
    if missing:
        raise PmvisError(f"{where}: checkpoint record has no {' / '.join(missing)} (not written by pmvis, or edited)")
    if not isinstance(state["model_config"], dict):
        raise PmvisError(f"{where}: checkpoint model_config is not a mapping")
    # a knob an older checkpoint does not record had its old value then, whatever today's default is
    return build_config(ModelConfig, {**LATER_KNOBS, **state["model_config"], "backbone_weights": None},
                        source=f"{where}: model_config")


def check_compatible(state: dict[str, Any], model_cfg: ModelConfig) -> None:
    """Refuse a checkpoint trained with another architecture, saying which knobs differ."""
    checkpoint_model_config(state)
    if state["fingerprint"] == config_fingerprint(model_cfg):
        return
    theirs = {**LATER_KNOBS, **state["model_config"]}
    ours = model_cfg.model_dump(mode="json")
    diff = sorted(k for k in set(theirs) | set(ours) if k != "backbone_weights" and theirs.get(k) != ours.get(k))
    details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diff[:8])
    raise PmvisError(f"{state['path']}: checkpoint was trained with a different model config ({details})")


CLASS_HEAD_PREFIX = "transformer.class_heads."


def initial_weights(state: dict[str, Any], model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of checkpoint ``state`` to start a ``model_cfg`` training from: all of them when the
    architectures match; when only ``num_classes`` differs (a COCO pretraining, 80 classes, starting a
    40-class YouTube-VIS run) all but the class heads, which keep their fresh initialisation — what
    detectron2's checkpointer does for IDOL when it skips the shape-mismatched ``class_embed``.
    Returns (weights, names left out); any other difference is check_compatible's PmvisError."""
    theirs = checkpoint_model_config(state)
    if theirs.num_classes == model_cfg.num_classes:
        check_compatible(state, model_cfg)
        return state["model"], []
    check_compatible(state, model_cfg.model_copy(update={"num_classes": theirs.num_classes}))
    skipped = [k for k in state["model"] if k.startswith(CLASS_HEAD_PREFIX)]
    return {k: v for k, v in state["model"].items() if not k.startswith(CLASS_HEAD_PREFIX)}, skipped


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig, dict]:
    """Build the checkpoint's architecture and load its weights; returns (model in eval mode, cfg, state)."""

    state = read_checkpoint(path)
    cfg = checkpoint_model_config(state)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise PmvisError(f"{state['path']}: weights do not fit the recorded config: {e}") from None
    return model.to(device).eval(), cfg, state


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike, *, half: bool = True,
                   extra: dict[str, Any] | None = None) -> Path:
    """A compact copy of a checkpoint for shipping (e.g. as package data): the model weights only
    (no optimizer or scheduler state), floating-point tensors in float16 when ``half`` — loading
    casts them back to the model's float32 (``load_state_dict`` copies with a dtype cast).
    The result is an ordinary checkpoint: :func:`read_checkpoint` and ``init_from`` accept it."""
    state = read_checkpoint(checkpoint)
    weights = {k: (v.half() if half and v.is_floating_point() else v) for k, v in state["model"].items()}
    keep = {k: v for k, v in (state.get("extra") or {}).items() if k in ("category_ids", "categories")}
    out_state = {
        "format_version": FORMAT_VERSION, "model": weights, "model_config": state["model_config"],
        "fingerprint": state["fingerprint"], "iteration": state["iteration"], "optimizer": None,
        "scheduler": None, "extra": {**keep, "exported_from": str(state["path"]), **(extra or {})},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(out_state, tmp)
    return out
