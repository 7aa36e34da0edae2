"""Helpers shared by the built-in pseudo-mask sources: boxes, devices, safe checkpoint loading."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

import numpy as np

from pmvis.core.devices import resolve_device  # noqa: F401  (re-exported for the sources)
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


