"""PM-VIS optimisation mechanisms (DOOB, SCM, SHQM, weighted vote) and pseudo-mask fusion.

The paper names the mechanisms but did not publish their exact definitions; these are ours
(docs/design.md §4.4) and every threshold is a knob of :class:`FuseConfig`. For one annotation and one
frame where the ground truth has a box, each source's mask goes through, in this order:

1. **DOOB** (delete out-of-box, ``doob``): pixels outside the GT box are zeroed. A pixel is kept
   when it overlaps the box at all (``floor(x)..ceil(x + w)``), widened by ``doob_margin`` pixels
   on every side and clipped to the image. A mask left empty does not survive.
2. **SCM** (score confidence mechanism): a mask whose own confidence is below its source's
   ``scm_thresholds[source]`` is dropped (a source missing from the dict has threshold 0). A
   stored mask whose confidence is null counts as confidence 0. A source whose weight is 0 is
   switched off: its masks never survive.
3. **SHQM** (select high-quality masks, ``mode: select``): among the survivors, the mask with the
   highest quality = ``weight × confidence × tightness`` wins, where tightness is the IoU between
   the GT box and the (DOOB-cleaned) mask's tight bounding box. Ties go to the source listed first
   (``sources`` order, or the store's sources sorted by name). The frame's quality is the winner's.
   Quality is not capped at 1: weights above 1 scale it.
   **Weighted vote** (``mode: vote``): pixel p is foreground iff
   ``Σ_s w_s·c_s·m_s(p) / Σ_s w_s·c_s ≥ vote_threshold`` over the survivors. The fused frame's
   quality is the weight-averaged confidence of the survivors ``Σ w_s·c_s / Σ w_s`` times the
   tightness of the voted mask; its source is ``"vote"``. An empty vote, or survivors whose
   ``w·c`` are all 0, give no mask.

A source missing from ``source_weights`` has weight 1.0. A dict given in a config file replaces
the default dict whole (it is not merged key by key); the effective config written next to each
output shows the values used.

The pure functions on numpy masks (:func:`doob`, :func:`scm_keep`, :func:`box_tightness`,
:func:`select_mask`, :func:`vote_masks`, :func:`fuse_frame`) are the reference definitions.
:func:`fuse_annotations` computes the same result on compressed RLEs (pycocotools merge / area /
toBbox, a mask is decoded only for a vote between several survivors), which keeps fusion cheap
enough to re-run for every sweep trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import Field, field_validator

from pmvis.core.config import StrictConfig
from pmvis.core.masks import rle_areas

Box = Sequence[float]  # [x, y, w, h] in pixels
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

# A box edge within this many pixels of an integer counts as on it (float noise in box files).
_EDGE_EPS = 1e-6
# Votes among at most this many survivors are computed on RLEs (2^n coalitions); more are decoded.
MAX_RLE_VOTERS = 8
# How many offending ids an error message lists.
MAX_LISTED = 20


def check_source_list(sources: list[str], otherwise: str) -> list[str]:
    """A config's list of source names: not empty (the message says what to do ``otherwise``), no repeats."""
    if not sources:
        raise ValueError(f"must list at least one source ({otherwise})")
    dup = sorted({s for s in sources if sources.count(s) > 1})
    if dup:
        raise ValueError(f"lists a source more than once: {dup}")
    return sources


class FuseConfig(StrictConfig):
    """Every knob of pseudo-mask fusion (see the module docstring for the exact definitions)."""

    mode: Literal["select", "vote"] = "select"
    source_weights: dict[str, Weight] = Field(
        default_factory=lambda: {"hqsam": 1.0, "track": 1.0, "boxinst": 1.0, "grabcut": 0.5},
        description="per-source weight (>= 0; 0 switches a source off; unlisted sources: 1.0)",
    )
    scm_thresholds: dict[str, Unit] = Field(
        default_factory=lambda: {"hqsam": 0.5, "track": 0.9, "boxinst": 0.3, "grabcut": 0.0},
        description="SCM: per-source minimum confidence in [0, 1] (unlisted sources: 0)",
    )
    doob: bool = True
    doob_margin: int = Field(0, ge=0, description="DOOB keeps this many pixels around the GT box")
    vote_threshold: float = Field(0.5, gt=0, le=1, description="weighted-vote foreground threshold")
    sources: list[str] | None = Field(None, description="sources to fuse, in tie-break order; null: all in the store")

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else check_source_list(v, "or be null for every source in the store")

    def weight(self, source: str) -> float:
        return float(self.source_weights.get(source, 1.0))

    def threshold(self, source: str) -> float:
        return float(self.scm_thresholds.get(source, 0.0))


# ----------------------------------------------------------------------------- mechanisms (numpy)


def confidence_or_zero(c: float | None) -> float:
    """A null or NaN confidence counts as 0."""
    if c is None:
        return 0.0
    c = float(c)
    return 0.0 if math.isnan(c) else c


def doob_window(box: Box, margin: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The pixel window ``(x0, y0, x1, y1)`` (exclusive ends) DOOB keeps: every pixel overlapping
    the box, widened by ``margin`` and clipped to the image (may be empty)."""
    x, y, w, h = (float(b) for b in box)
    x0 = max(math.floor(x + _EDGE_EPS) - margin, 0)
    y0 = max(math.floor(y + _EDGE_EPS) - margin, 0)
    x1 = min(math.ceil(x + w - _EDGE_EPS) + margin, width)
    y1 = min(math.ceil(y + h - _EDGE_EPS) + margin, height)
    return x0, y0, max(x1, x0), max(y1, y0)


def doob(mask: np.ndarray, box: Box, margin: int = 0) -> np.ndarray:
    """DOOB: a copy of ``mask`` with every pixel outside the box (+ margin) zeroed."""
    mask = np.asarray(mask, dtype=bool)
    x0, y0, x1, y1 = doob_window(box, margin, *mask.shape)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def scm_keep(confidence: float | None, source: str, cfg: FuseConfig) -> bool:
    """SCM: does a mask with this confidence from ``source`` survive?"""
    return confidence_or_zero(confidence) >= cfg.threshold(source)


def box_iou(a: Box, b: Box) -> float:
    """IoU of two ``[x, y, w, h]`` boxes (0 when the union is empty)."""
    ax, ay, aw, ah = (float(v) for v in a)
    bx, by, bw, bh = (float(v) for v in b)
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> list[float] | None:
    """The tight ``[x, y, w, h]`` box of a mask (pycocotools' toBbox convention); None if empty."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def box_tightness(mask: np.ndarray, box: Box) -> float:
    """IoU between the GT box and the mask's tight bounding box; 0 for an empty mask."""
    mb = mask_box(mask)
    return 0.0 if mb is None else box_iou(mb, box)


@dataclass
class FrameFusion:
    """One fused frame: the mask, its quality and the winning source (``"vote"`` in vote mode)."""

    mask: np.ndarray
    quality: float
    source: str


# survivors: source -> (DOOB-cleaned non-empty mask, confidence), in tie-break order
Survivors = Mapping[str, tuple[np.ndarray, float]]


def select_mask(survivors: Survivors, box: Box, cfg: FuseConfig) -> FrameFusion | None:
    """SHQM: the survivor maximising weight × confidence × tightness (first listed wins ties)."""
    best: FrameFusion | None = None
    for source, (mask, conf) in survivors.items():
        q = cfg.weight(source) * confidence_or_zero(conf) * box_tightness(mask, box)
        if best is None or q > best.quality:
            best = FrameFusion(np.asarray(mask, dtype=bool), q, source)
    return best


def vote_masks(survivors: Survivors, box: Box, cfg: FuseConfig) -> FrameFusion | None:
    """Weighted pixel vote: foreground iff Σ w·c·m / Σ w·c ≥ vote_threshold (None if empty)."""
    if not survivors:
        return None
    items = [(cfg.weight(s), confidence_or_zero(c), np.asarray(m, dtype=bool)) for s, (m, c) in survivors.items()]
    total = sum(w * c for w, c, _ in items)
    weights = sum(w for w, _, _ in items)
    if total <= 0 or weights <= 0:
        return None
    acc = np.zeros(items[0][2].shape, dtype=np.float64)
    for w, c, m in items:
        acc += (w * c) * m
    fg = acc / total >= cfg.vote_threshold
    if not fg.any():
        return None
    return FrameFusion(fg, total / weights * box_tightness(fg, box), "vote")


def fuse_frame(
    candidates: Mapping[str, tuple[np.ndarray | None, float | None]], box: Box, cfg: FuseConfig
) -> FrameFusion | None:
    """The reference definition for one (annotation, frame): DOOB, SCM, then select or vote.

    ``candidates`` maps source → (mask or None, confidence), in tie-break order.
    """
    survivors: dict[str, tuple[np.ndarray, float]] = {}
    for source, (mask, conf) in candidates.items():
        if mask is None or cfg.weight(source) <= 0 or not scm_keep(conf, source, cfg):
            continue
        m = doob(mask, box, cfg.doob_margin) if cfg.doob else np.asarray(mask, dtype=bool)
        if m.any():
            survivors[source] = (m, confidence_or_zero(conf))
    return (select_mask if cfg.mode == "select" else vote_masks)(survivors, box, cfg)


# ----------------------------------------------------------------------------- fusion on RLEs


def rect_rle(window: tuple[int, int, int, int], height: int, width: int) -> dict:
    """A filled pixel window as a pycocotools RLE, built from its run lengths (no pixel array)."""
    x0, y0, x1, y1 = window
    h, n = y1 - y0, x1 - x0
    if h <= 0 or n <= 0:
        counts = [height * width]
    else:
        counts = [x0 * height + y0] + [h, height - h] * (n - 1) + [h, (height - y1) + (width - x1) * height]
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def vote_rle(survivors: list[tuple[str, dict, float]], box: Box, cfg: FuseConfig) -> tuple[dict, float, str] | None:
    """:func:`vote_masks` on RLEs, bit for bit: a pixel's vote depends only on which survivors
    cover it, so the foreground is the union, over the *winning* coalitions S (the ordered float
    sum of w·c over S, divided by Σ w·c, reaches the threshold), of the intersection of S's masks.
    Winning is upward closed (float addition rounds monotonically), so minimal coalitions suffice.
    """
    a = [cfg.weight(s) * c for s, _, c in survivors]
    total = sum(a)
    weights = sum(cfg.weight(s) for s, _, _ in survivors)
    if total <= 0 or weights <= 0:
        return None
    n = len(survivors)
    winning = []
    for bits in range(1, 1 << n):
        acc = 0.0
        for i in range(n):
            if bits >> i & 1:
                acc += a[i]  # the same additions, in the same order, as vote_masks' accumulator
        if acc / total >= cfg.vote_threshold:
            winning.append(bits)
    minimal = [b for b in winning if not any(o != b and o & b == o for o in winning)]
    parts = []
    for bits in minimal:
        members = [survivors[i][1] for i in range(n) if bits >> i & 1]
        parts.append(members[0] if len(members) == 1 else mask_utils.merge(members, intersect=True))
    if not parts:
        return None
    fg = parts[0] if len(parts) == 1 else mask_utils.merge(parts, intersect=False)
    if rle_areas([fg])[0] == 0:
        return None
    return fg, total / weights * box_iou(mask_utils.toBbox([fg])[0], box), "vote"
