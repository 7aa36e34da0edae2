"""The timm backbone: multi-scale features by stride, weights only from a local file.

``timm.create_model(name, features_only=True, pretrained=False, out_indices=...)`` with the out
indices chosen by stride (probed on the meta device, so nothing is computed twice). Weights are a
state dict saved with ``torch.save`` — of the features-only model, or of a full timm model of the
same architecture whose feature wrapper keeps the module names (ResNets, ConvNeXts), or a
detectron2-named ResNet (``stem.*``, ``res2.*`` … as in IDOL's ``R-50`` start, renamed on load): keys
the backbone does not have (the classifier) are ignored, a missing or mis-shaped key is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pmvis.core.errors import PmvisError
from pmvis.models.torch_files import load_torch_file, state_dict_from

# optional in a checkpoint: BatchNorm's step counter
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_NESTED_KEYS = ("state_dict", "model")


def _feature_info(name: str) -> tuple[list[int], list[str]]:
    """(stride, module name) of every feature level of the timm model ``name``."""
    import timm  # here, not at module import: timm (and torchvision) take seconds, only model builders need it

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, features_only=True, pretrained=False)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise PmvisError(f"backbone {name!r}: {e}") from None
    except Exception as e:  # a model without features_only support
        raise PmvisError(f"backbone {name!r} cannot give multi-scale features: {e}") from None
    return list(probe.feature_info.reduction()), list(probe.feature_info.module_name())


class Backbone(nn.Module):
    """Features of the requested strides: ``forward(images) -> {stride: (B, C_s, H/s, W/s)}``."""

    def __init__(self, name: str, strides: list[int], *, weights: str | None = None, freeze_bn: bool = True) -> None:
        super().__init__()
        available, self.stage_modules = _feature_info(name)
        self.frozen: list[str] = []  # top-level modules of self.body kept frozen (freeze_stages)
        missing = [s for s in strides if s not in available]
        if missing:
            raise PmvisError(f"backbone {name!r} has feature strides {available}, not {missing}")
        indices = tuple(available.index(s) for s in strides)
        import timm
        from timm.layers import freeze_batch_norm_2d

        self.body = timm.create_model(name, features_only=True, pretrained=False, out_indices=indices)
        self.strides = list(strides)
        self.channels = dict(zip(self.strides, self.body.feature_info.channels()))
        if weights is not None:
            load_backbone_weights(self.body, weights)
        if freeze_bn:
            self.body = freeze_batch_norm_2d(self.body)

    def freeze_stages(self, freeze_at: int) -> list[str]:
        """Freeze the first ``freeze_at`` stages, as detectron2's ``MODEL.BACKBONE.FREEZE_AT``: 1 the
        stem, 2 the stem and the first residual stage (res2; IDOL's setting), … — no gradient, and
        their BatchNorm layers stay in eval mode (fixed statistics; the modules and the state-dict
        keys are unchanged, so checkpoints load either way). Returns the frozen module names."""
        if not 0 <= freeze_at <= len(self.stage_modules):
            raise PmvisError(f"freeze_at must be in 0..{len(self.stage_modules)} for this backbone, got {freeze_at}")
        self.frozen = []
        if freeze_at == 0:
            return []
        last = self.stage_modules[freeze_at - 1].replace(".", "_")  # FeatureListNet flattens nested names
        for child_name, child in self.body.named_children():
            child.requires_grad_(False)
            self.frozen.append(child_name)
            if child_name == last:
                break
        self.train(self.training)
        return list(self.frozen)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for child_name in self.frozen:
            getattr(self.body, child_name).eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return dict(zip(self.strides, self.body(images)))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = state_dict_from(load_torch_file(path, "backbone weights"), path, "backbone weights", keys=_NESTED_KEYS)
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PmvisError(f"{path}: expected a mapping of parameter names to tensors")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    return _timm_names(state)


def _timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detectron2-named ResNet (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``; optionally under
    ``backbone.``, ``backbone.bottom_up.`` or an IDOL checkpoint's ``detr.detr.backbone.0.backbone.``)
    renamed to timm's names; any other state dict unchanged."""
    from .convert_idol import detectron2_resnet_name

    for prefix in ("detr.detr.backbone.0.backbone.", "backbone.bottom_up.", "backbone.", ""):
        if f"{prefix}stem.conv1.weight" in state:
            renamed = {detectron2_resnet_name(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
            return {k: v for k, v in renamed.items() if k is not None}
    return state


def load_backbone_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``module``; PmvisError naming the file on any mismatch."""
    path = Path(path)
    state = _read_state_dict(path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} mis-shaped tensors (e.g. {'; '.join(wrong[:3])})")
        raise PmvisError(f"{path}: does not fit the backbone: {', '.join(parts)}")
    module.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
