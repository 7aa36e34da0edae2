"""Torch weight files, read one way: ``torch.load(map_location="cpu", weights_only=True)`` (a file can
carry tensors and plain containers, never objects that run on load), every failure a PmvisError
naming the file; then the state dict inside it and a strict load into a module. Checkpoints,
backbone weights and the pseudo-mask sources' model weights all come through here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pmvis.core.errors import PmvisError

log = logging.getLogger(__name__)


def load_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a missing, unreadable or
    corrupt file is a PmvisError saying which ``what`` (e.g. "checkpoint", "hqsam checkpoint")."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PmvisError(f"{p}: {what} not found")
    if not p.is_file():
        raise PmvisError(f"{p}: {what} is not a regular file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PmvisError(f"{p}: not a readable {what} (corrupt, truncated, or not a plain torch weights file: "
                         f"{type(e).__name__}: {first})") from None


def state_dict_from(obj: Any, path: str | Path, what: str, keys: Sequence[str] = ()) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint: ``obj[key]`` for the first of ``keys`` present, else obj."""
    for key in keys:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise PmvisError(f"{path}: the {what} does not contain a state dict "
                         f"(expected a mapping of parameter names to tensors"
                         + (f" under one of the keys {list(keys)}" if keys else "") + ")")
    return obj


def load_state_dict_strict(model: Any, state: Mapping[str, Any], path: str | Path, what: str, *,
                           allow_unexpected: bool = False) -> None:
    """Load ``state`` into ``model``; missing or mis-shaped parameters are a PmvisError.

    Strict on purpose: a checkpoint of another model variant (e.g. vit_b weights for a vit_tiny
    model) must not silently leave part of the model at random values. Parameters the model does
    not have are an error too, unless ``allow_unexpected`` (then they are logged and ignored).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and hasattr(state[k], "shape")
                  and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing parameter(s), e.g. {missing[:3]}")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected parameter(s), e.g. {unexpected[:3]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:2]}")
    if problems:
        raise PmvisError(f"{path}: the {what} does not fit this model ({'; '.join(problems)}); "
                         f"is it a checkpoint of another model type/config?")
    if unexpected and allow_unexpected:
        log.warning("%s: the %s has %d parameter(s) the model does not have, ignored, e.g. %s",
                    path, what, len(unexpected), unexpected[:3])
        state = {k: v for k, v in state.items() if k in own}
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise PmvisError(f"{path}: the {what} cannot be loaded into the model: {e}") from None
