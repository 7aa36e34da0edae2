"""Helpers shared by the built-in pseudo-mask sources: boxes, devices, safe checkpoint loading."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pmvis.core.devices import resolve_device  # noqa: F401  (re-exported for the sources)
from pmvis.core.errors import PmvisError
from pmvis.models.sources.base import SourceMasks, VideoInput

log = logging.getLogger("pmvis.sources")


# ----------------------------------------------------------------------------- boxes and masks


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """``[x, y, w, h]`` → pixel rectangle ``(x0, y0, x1, y1)`` (exclusive ends), clipped to the image.

    Pixels whose centres lie inside the box, the rounding ``pmvis.platform.data.ytvis.box_mask_rle``
    uses, so a filled-box fallback here equals the filled-box baseline.
    """
    x0 = min(max(int(round(box[0])), 0), width)
    y0 = min(max(int(round(box[1])), 0), height)
    x1 = min(max(int(round(box[0] + box[2])), 0), width)
    y1 = min(max(int(round(box[1] + box[3])), 0), height)
    return x0, y0, max(x1, x0), max(y1, y0)


def filled_box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box_pixels(box, height, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def box_xyxy(box: Sequence[float]) -> list[float]:
    """``[x, y, w, h]`` → ``[x0, y0, x1, y1]`` in continuous pixel coordinates (the SAM prompt form)."""
    return [float(box[0]), float(box[1]), float(box[0]) + float(box[2]), float(box[1]) + float(box[3])]


def empty_tracks(video: VideoInput) -> dict[int, SourceMasks]:
    """One all-``None`` track per annotation of the video (every source returns every annotation)."""
    T = video.length
    return {aid: SourceMasks(masks=[None] * T, confidences=[None] * T) for aid in video.boxes}


def clip01(x: float) -> float:
    if not math.isfinite(x):
        return 0.0
    return float(min(max(x, 0.0), 1.0))


# ----------------------------------------------------------------------------- checkpoints


def warn_random_weights(what: str) -> None:
    """The loud warning every model source gives when it runs without a checkpoint."""
    msg = (f"{what}: NO CHECKPOINT GIVEN — running with RANDOM weights. The masks are meaningless; "
           f"this is only for tests and demos. Pass `checkpoint: /path/to/weights` for real runs.")
    log.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def load_checkpoint_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; every failure names the path.

    ``weights_only=True`` refuses pickled code: a checkpoint can carry tensors and plain
    containers, never objects that run on load.
    """
    import torch

    p = Path(path).expanduser()
    if not p.exists():
        raise PmvisError(f"{what} checkpoint {p}: file not found")
    if not p.is_file():
        raise PmvisError(f"{what} checkpoint {p}: not a regular file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PmvisError(f"{what} checkpoint {p}: cannot be read as a torch weights file "
                         f"(corrupt, truncated, or not a plain state dict): {first}") from None


def state_dict_from(obj: Any, path: str | Path, what: str, keys: Sequence[str] = ()) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint: ``obj[key]`` for the first of ``keys`` present, else obj."""
    for key in keys:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise PmvisError(f"{what} checkpoint {path}: does not contain a state dict "
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
        raise PmvisError(f"{what} checkpoint {path}: does not fit this model ({'; '.join(problems)}); "
                         f"is it a checkpoint of another model type/config?")
    if unexpected and allow_unexpected:
        log.warning("%s checkpoint %s: ignoring %d parameter(s) the model does not have, e.g. %s",
                    what, path, len(unexpected), unexpected[:3])
        state = {k: v for k, v in state.items() if k in own}
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise PmvisError(f"{what} checkpoint {path}: cannot be loaded into the model: {e}") from None
