"""VNext IDOL checkpoints → pmvis weights for ``model.mask_head: idol`` (`pmvis import-checkpoint`).

An IDOL checkpoint (detectron2's ``{"model": state_dict, ...}``, prefix ``detr.detr.`` for the
Deformable-DETR body and ``detr.`` for the CondInst heads) maps name by name onto :class:`IDOL`:

=====================================================  ===============================================
VNext IDOL                                             pmvis
=====================================================  ===============================================
``detr.detr.backbone.0.backbone.stem.conv1[.norm]``    ``backbone.body.conv1`` / ``bn1``
``…backbone.resN.i.convK[.norm]``, ``.shortcut``       ``backbone.body.layer{N-1}.i.convK`` / ``bnK``,
                                                       ``downsample.0`` / ``.1``
``detr.detr.input_proj.*``, ``query_embed``            ``input_proj.*``, ``transformer.query_embed``
``detr.detr.transformer.{level_embed,reference_points}``  ``transformer.*`` (same names)
``…encoder.layers.i.{self_attn,norm1,linear1,linear2,norm2}``  ``transformer.encoder.i.{self_attn,norm,
                                                       ffn.linear1,ffn.linear2,ffn.norm}``
``…decoder.layers.i.{self_attn,norm2,cross_attn,norm1,  ``transformer.decoder.i.{self_attn,norm1,cross_attn,
linear1,linear2,norm3}``                               norm2,ffn.linear1,ffn.linear2,ffn.norm}``
``detr.detr.class_embed.i`` / ``bbox_embed.i``         ``transformer.class_heads.i`` / ``box_heads.i``
``detr.controller.layers.k``                           ``controller.mlp.layers.k``
``detr.mask_head.{lay1..lay4,dcn}``                    ``mask_head.*`` (same names)
``detr.reid_embed_head.layers.k``                      ``embed_head.layers.k``
=====================================================  ===============================================

IDOL's decoder names its post-self-attention norm ``norm2`` and its post-cross-attention norm
``norm1``; pmvis numbers them in order. ``detr.detr.transformer.decoder.bbox_embed.*`` is the same
ModuleList as ``detr.detr.bbox_embed.*`` registered twice (box refinement): those tensors must equal
their twins and map to the same parameters. The conversion is strict: every official tensor maps to
exactly one pmvis tensor of the same shape, or a PmvisError names the tensors left over, the
parameters missing and the shapes that differ.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from pmvis.core.errors import PmvisError
from pmvis.models.torch_files import load_torch_file, state_dict_from

from .config import ModelConfig

BODY = "detr.detr."
ALIAS_PREFIX = BODY + "transformer.decoder.bbox_embed."
# detectron2 ResNet stage → timm ResNet layer
_D2_RESNET = [
    (re.compile(r"^stem\.conv1\.norm\.(.+)$"), r"bn1.\1"),
    (re.compile(r"^stem\.conv1\.(weight|bias)$"), r"conv1.\1"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.norm\.(.+)$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.(weight|bias)$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.{m[3]}"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(.+)$"), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.(weight|bias)$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.{m[4]}"),
]
_ENCODER = {"self_attn": "self_attn", "norm1": "norm", "linear1": "ffn.linear1", "linear2": "ffn.linear2",
            "norm2": "ffn.norm"}
_DECODER = {"self_attn": "self_attn", "norm2": "norm1", "cross_attn": "cross_attn", "norm1": "norm2",
            "linear1": "ffn.linear1", "linear2": "ffn.linear2", "norm3": "ffn.norm"}


def detectron2_resnet_name(name: str) -> str | None:
    """A detectron2 ResNet parameter name (``stem.conv1.weight``, ``res3.0.conv2.norm.running_var``)
    → its timm ResNet name (``conv1.weight``, ``layer2.0.bn2.running_var``); None if not one."""
    for pattern, repl in _D2_RESNET:
        m = pattern.match(name)
        if m:
            return repl(m) if callable(repl) else pattern.sub(repl, name)
    return None


def _sub(rest: str, table: dict[str, str]) -> str | None:
    m = re.match(r"^layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", rest)
    if not m or m[2] not in table:
        return None
    return f"{m[1]}.{table[m[2]]}.{m[3]}"


def idol_to_pmvis_name(name: str) -> str | None:
    """The pmvis parameter an official IDOL tensor name maps to (None: no rule matches)."""
    if name.startswith(BODY + "backbone.0.backbone."):
        timm_name = detectron2_resnet_name(name[len(BODY + "backbone.0.backbone."):])
        return None if timm_name is None else "backbone.body." + timm_name
    if name.startswith(ALIAS_PREFIX):
        return "transformer.box_heads." + name[len(ALIAS_PREFIX):]
    if name.startswith(BODY + "transformer."):
        rest = name[len(BODY + "transformer."):]
        if rest in ("level_embed",) or rest.startswith("reference_points."):
            return "transformer." + rest
        if rest.startswith("encoder."):
            sub = _sub(rest[len("encoder."):], _ENCODER)
            return None if sub is None else "transformer.encoder." + sub
        if rest.startswith("decoder."):
            sub = _sub(rest[len("decoder."):], _DECODER)
            return None if sub is None else "transformer.decoder." + sub
        return None
    for prefix, target in ((BODY + "class_embed.", "transformer.class_heads."),
                           (BODY + "bbox_embed.", "transformer.box_heads."),
                           (BODY + "input_proj.", "input_proj."),
                           (BODY + "query_embed.", "transformer.query_embed."),
                           ("detr.controller.", "controller.mlp."),
                           ("detr.mask_head.", "mask_head."),
                           ("detr.reid_embed_head.", "embed_head.")):
        if name.startswith(prefix):
            return target + name[len(prefix):]
    return None


def idol_model_config(state: Mapping[str, torch.Tensor], **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of an IDOL R50 checkpoint: IDOL's sizes, ``mask_head: idol``, raw
    pixel relative coordinates, and the number of classes read off ``class_embed`` (40 for
    YouTube-VIS 2019/2021, 25 for OVIS, 80 for a COCO pretraining)."""
    key = BODY + "class_embed.0.weight"
    if key not in state:
        raise PmvisError(f"not a VNext IDOL checkpoint: no {key!r} (found e.g. {list(state)[:3]})")
    values = dict(backbone="resnet50", freeze_backbone_bn=True, backbone_strides=(8, 16, 32), mask_head="idol",
                  rel_coords_scale=1.0, num_classes=int(state[key].shape[0]),
                  num_queries=int(state[BODY + "query_embed.weight"].shape[0]) if BODY + "query_embed.weight" in state
                  else 300)
    values.update(overrides)
    return ModelConfig(**values)


def convert_idol_state_dict(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                            *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map an IDOL state dict onto ``target`` (a pmvis model's ``state_dict()``): strict both ways.

    Returns the pmvis state dict. Raises PmvisError naming, with counts, the official tensors no rule
    maps (left over), the pmvis tensors nothing fills (missing), the shape mismatches, and aliased
    tensors that differ from their twin."""
    out: dict[str, torch.Tensor] = {}
    left_over, mismatched, alias_diff = [], [], []
    sources: dict[str, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            left_over.append(name)
            continue
        new = idol_to_pmvis_name(name)
        if new is None or new not in target:
            left_over.append(name)
            continue
        if tuple(tensor.shape) != tuple(target[new].shape):
            mismatched.append(f"{name} {tuple(tensor.shape)} → {new} {tuple(target[new].shape)}")
            continue
        if new in out:
            if name.startswith(ALIAS_PREFIX) or sources[new].startswith(ALIAS_PREFIX):
                if not torch.equal(out[new], tensor):
                    alias_diff.append(f"{name} ≠ {sources[new]}")
                continue
            left_over.append(f"{name} (a second tensor for {new}, after {sources[new]})")
            continue
        out[new], sources[new] = tensor.detach().clone(), name
    missing = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    if left_over or missing or mismatched or alias_diff:
        parts = []
        for what, items in (("tensors left over", left_over), ("parameters missing", missing),
                            ("shape mismatches", mismatched), ("aliased tensors that differ", alias_diff)):
            if items:
                parts.append(f"{len(items)} {what}: {', '.join(items[:8])}" + (" …" if len(items) > 8 else ""))
        raise PmvisError(f"{source}: does not convert to pmvis's IDOL model: " + "; ".join(parts))
    for k, v in target.items():  # buffers pmvis has and IDOL does not need (BN step counters)
        if k not in out:
            out[k] = v.clone()
    return out


def import_idol_checkpoint(path: str | Path, out: str | Path, *,
                           category_ids: Sequence[int] | None = None) -> tuple[Path, ModelConfig]:
    """Convert the VNext IDOL checkpoint ``path`` into the pmvis checkpoint ``out`` (written atomically).

    ``category_ids``: class index → dataset category id, recorded for `pmvis predict` (default
    1 … C, IDOL's contiguous map of the YouTube-VIS / OVIS category ids)."""
    from .checkpoint import save_checkpoint  # checkpoint imports the model registry; keep this module light
    from .idol import build_model

    path = Path(path)
    state = state_dict_from(load_torch_file(path, "IDOL checkpoint"), path, "IDOL checkpoint", keys=("model",))
    state = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}
    cfg = idol_model_config(state)
    ids = list(range(1, cfg.num_classes + 1)) if category_ids is None else [int(i) for i in category_ids]
    if len(ids) != cfg.num_classes or len(set(ids)) != len(ids):
        raise PmvisError(f"--category-ids: {len(ids)} ids {ids} for a checkpoint of {cfg.num_classes} classes "
                         "(one unique id per class)")
    model = build_model(cfg)
    model.load_state_dict(convert_idol_state_dict(state, model.state_dict(), source=str(path)))
    return save_checkpoint(out, model, cfg, extra={"category_ids": ids, "imported_from": str(path),
                                                   "imported_format": "idol"}), cfg
