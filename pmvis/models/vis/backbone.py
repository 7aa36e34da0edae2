"""The timm backbone: multi-scale features by stride, weights only from a local file.

``timm.create_model(name, features_only=True, pretrained=False, out_indices=...)`` with the out
indices chosen by stride (probed on the meta device, so nothing is computed twice). Weights are a
state dict saved with ``torch.save`` — of the features-only model, or of a full timm model of the
same architecture whose feature wrapper keeps the module names (ResNets, ConvNeXts): keys the
backbone does not have (the classifier) are ignored, a missing or mis-shaped key is an error.
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


def _feature_strides(name: str) -> list[int]:
    import timm  # here, not at module import: timm (and torchvision) take seconds, only model builders need it

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, features_only=True, pretrained=False)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise PmvisError(f"backbone {name!r}: {e}") from None
    except Exception as e:  # a model without features_only support
        raise PmvisError(f"backbone {name!r} cannot give multi-scale features: {e}") from None
    return list(probe.feature_info.reduction())


class Backbone(nn.Module):
    """Features of the requested strides: ``forward(images) -> {stride: (B, C_s, H/s, W/s)}``."""

    def __init__(self, name: str, strides: list[int], *, weights: str | None = None, freeze_bn: bool = True) -> None:
        super().__init__()
        available = _feature_strides(name)
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

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return dict(zip(self.strides, self.body(images)))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = state_dict_from(load_torch_file(path, "backbone weights"), path, "backbone weights", keys=_NESTED_KEYS)
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PmvisError(f"{path}: expected a mapping of parameter names to tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


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
