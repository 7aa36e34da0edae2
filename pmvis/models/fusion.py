"""PM-VIS optimisation mechanisms (DOOB, SCM, SHQM, weighted vote) and pseudo-mask fusion.

The paper names the mechanisms but did not publish their exact definitions; these are ours
(DESIGN.md §4.4) and every threshold is a knob of :class:`FuseConfig`. For one annotation and one
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
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import Field, field_validator

from pmvis.platform.config import StrictConfig
from pmvis.platform.errors import PmvisError
from pmvis.platform.raw_masks import RawTrack, tracks_by_annotation
from pmvis.platform.ytvis import Annotation, Rle, YTVISDataset, rle_areas, to_coco_rles

Box = Sequence[float]  # [x, y, w, h] in pixels
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

# A box edge within this many pixels of an integer counts as on it (float noise in box files).
_EDGE_EPS = 1e-6
# Votes among at most this many survivors are computed on RLEs (2^n coalitions); more are decoded.
_MAX_RLE_VOTERS = 8
# How many offending ids an error message lists.
_MAX_LISTED = 20


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
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one source (or be null for every source in the store)")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"lists a source more than once: {dup}")
        return v

    def weight(self, source: str) -> float:
        return float(self.source_weights.get(source, 1.0))

    def threshold(self, source: str) -> float:
        return float(self.scm_thresholds.get(source, 0.0))


# ----------------------------------------------------------------------------- mechanisms (numpy)


def _confidence(c: float | None) -> float:
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
    return _confidence(confidence) >= cfg.threshold(source)


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
        q = cfg.weight(source) * _confidence(conf) * box_tightness(mask, box)
        if best is None or q > best.quality:
            best = FrameFusion(np.asarray(mask, dtype=bool), q, source)
    return best


def vote_masks(survivors: Survivors, box: Box, cfg: FuseConfig) -> FrameFusion | None:
    """Weighted pixel vote: foreground iff Σ w·c·m / Σ w·c ≥ vote_threshold (None if empty)."""
    if not survivors:
        return None
    items = [(cfg.weight(s), _confidence(c), np.asarray(m, dtype=bool)) for s, (m, c) in survivors.items()]
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
            survivors[source] = (m, _confidence(conf))
    return (select_mask if cfg.mode == "select" else vote_masks)(survivors, box, cfg)


# ----------------------------------------------------------------------------- the raw store


TrackIndex = dict[int, dict[str, RawTrack]]


def index_tracks(
    dataset: YTVISDataset,
    raw_tracks: Iterable[RawTrack] | Mapping[int, Mapping[str, RawTrack]],
    sources: Sequence[str] | None,
) -> tuple[TrackIndex, list[str]]:
    """Index tracks by annotation and source, and check them against ``dataset``.

    Returns the index and the source order (``sources``, or every source present sorted by
    name). Errors: a requested source with no tracks, store annotation ids the dataset lacks, a
    track whose video id, length or mask size disagrees with the dataset.
    """
    if isinstance(raw_tracks, Mapping):
        by_ann: TrackIndex = {int(a): dict(d) for a, d in raw_tracks.items()}
    else:
        by_ann = tracks_by_annotation(raw_tracks)
    available = sorted({s for d in by_ann.values() for s in d})
    if sources is None:
        order = available
        if not order:
            raise PmvisError("no raw pseudo-mask tracks to fuse (the store is empty)")
    else:
        order = list(sources)
        absent = [s for s in order if s not in available]
        if absent:
            raise PmvisError(f"source(s) {absent} not in the raw pseudo-mask store "
                             f"(it has {available or 'no sources'})")
    anns = {a.id: a for a in dataset.annotations}
    unknown = sorted(set(by_ann) - set(anns))
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:_MAX_LISTED])
        more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        where = f" {dataset.path}" if dataset.path else ""
        raise PmvisError(f"the raw pseudo-mask store has annotation id(s) {shown}{more} that the "
                         f"dataset{where} does not have (masks from a different annotation file?)")
    problems: list[str] = []
    for aid, per_source in by_ann.items():
        ann = anns[aid]
        video = dataset.videos[ann.video_id]
        for source in order:
            t = per_source.get(source)
            if t is None:
                continue
            where = f"source {source}, annotation id={aid}"
            if t.video_id != ann.video_id:
                problems.append(f"{where}: stored for video id={t.video_id}, the dataset says {ann.video_id}")
            elif len(t.segmentations) != video.length or len(t.confidences) != video.length:
                problems.append(f"{where} (video id={ann.video_id}): {len(t.segmentations)} masks and "
                                f"{len(t.confidences)} confidences for a {video.length}-frame video")
            else:
                for f, s in enumerate(t.segmentations):
                    if s is not None and list(s["size"]) != [video.height, video.width]:
                        problems.append(f"{where} (video id={ann.video_id}), frame {f}: mask size "
                                        f"{list(s['size'])}, video is [{video.height}, {video.width}]")
                        break
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise PmvisError("raw pseudo masks disagree with the dataset:\n  "
                         + "\n  ".join(problems[:_MAX_LISTED]) + more)
    return by_ann, order


# ----------------------------------------------------------------------------- fusion on RLEs


def _rect_rle(window: tuple[int, int, int, int], height: int, width: int) -> dict:
    """A filled pixel window as a pycocotools RLE, built from its run lengths (no pixel array)."""
    x0, y0, x1, y1 = window
    h, n = y1 - y0, x1 - x0
    if h <= 0 or n <= 0:
        counts = [height * width]
    else:
        counts = [x0 * height + y0] + [h, height - h] * (n - 1) + [h, (height - y1) + (width - x1) * height]
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def _to_str_rle(coco: dict) -> Rle:
    counts = coco["counts"]
    return {"size": [int(coco["size"][0]), int(coco["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _vote_rle(survivors: list[tuple[str, dict, float]], box: Box, cfg: FuseConfig) -> tuple[dict, float, str] | None:
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


def fuse_with_stats(
    dataset: YTVISDataset,
    raw_tracks: Iterable[RawTrack] | Mapping[int, Mapping[str, RawTrack]],
    config: FuseConfig,
) -> tuple[YTVISDataset, dict[str, Any]]:
    """:func:`fuse_annotations` plus its statistics (also stored in ``info["fusion"]``).

    Stats: ``annotations``, ``frames_with_box`` (GT frames with a box), ``fused_masks``,
    ``frames_without_fused_mask`` = ``frames_no_source_mask`` (no source has a mask there) +
    ``frames_rejected`` (masks there, none survived, or an empty vote), ``chosen`` (fused masks
    per winning source, or ``{"vote": n}``), ``considered`` / ``scm_dropped`` / ``empty`` (per
    source: masks on box frames, masks SCM dropped, masks empty after DOOB or as stored),
    ``annotations_without_tracks``, ``annotations_without_fused_mask``, ``mean_quality`` (over
    fused masks).
    """
    cfg = config
    by_ann, order = index_tracks(dataset, raw_tracks, cfg.sources)
    considered: Counter[str] = Counter()
    scm_dropped: Counter[str] = Counter()
    empty: Counter[str] = Counter()
    chosen: Counter[str] = Counter()
    frames_with_box = frames_no_mask = frames_rejected = 0
    no_tracks = no_fused = 0
    qualities: list[float] = []
    out_anns: list[Annotation] = []
    for ann in dataset.annotations:
        video = dataset.videos[ann.video_id]
        H, W, T = video.height, video.width, video.length
        tracks = by_ann.get(ann.id, {})
        srcs = [s for s in order if s in tracks]
        if not srcs:
            no_tracks += 1
        segs: list[Rle | None] = [None] * T
        areas: list[float | None] = [None] * T
        fq: list[float | None] = [None] * T
        fs: list[str | None] = [None] * T
        for t in range(T):
            box = ann.bboxes[t]
            if box is None:
                continue
            frames_with_box += 1
            window = doob_window(box, cfg.doob_margin, H, W) if cfg.doob else None
            box_rle = None
            cands: list[tuple[str, dict, float]] = []
            any_mask = False
            for s in srcs:
                rle = tracks[s].segmentations[t]
                if rle is None:
                    continue
                any_mask = True
                considered[s] += 1
                conf = _confidence(tracks[s].confidences[t])
                if cfg.weight(s) <= 0:
                    continue
                if not scm_keep(conf, s, cfg):
                    scm_dropped[s] += 1
                    continue
                coco = to_coco_rles([rle])[0]
                if window is not None:
                    if box_rle is None:
                        box_rle = _rect_rle(window, H, W)
                    coco = mask_utils.merge([coco, box_rle], intersect=True)
                cands.append((s, coco, conf))
            if not any_mask:
                frames_no_mask += 1
                continue
            fused: tuple[dict, float, str] | None = None
            if cands:
                cand_areas = rle_areas([c[1] for c in cands])
                bbs = mask_utils.toBbox([c[1] for c in cands])
                survivors = []
                for (s, coco, conf), a, bb in zip(cands, cand_areas, bbs):
                    if a > 0:
                        survivors.append((s, coco, conf, bb))
                    else:
                        empty[s] += 1
                if cfg.mode == "select":
                    for s, coco, conf, bb in survivors:
                        q = cfg.weight(s) * conf * box_iou(bb, box)
                        if fused is None or q > fused[1]:
                            fused = (coco, q, s)
                elif 0 < len(survivors) <= _MAX_RLE_VOTERS:
                    fused = _vote_rle([(s, coco, conf) for s, coco, conf, _ in survivors], box, cfg)
                elif survivors:
                    r = vote_masks({s: (mask_utils.decode(coco).astype(bool), conf)
                                    for s, coco, conf, _ in survivors}, box, cfg)
                    if r is not None:
                        enc = mask_utils.encode(np.asfortranarray(r.mask.astype(np.uint8)))
                        fused = (enc, r.quality, r.source)
            if fused is None:
                frames_rejected += 1
                continue
            coco, q, s = fused
            segs[t] = _to_str_rle(coco)
            areas[t] = int(rle_areas([coco])[0])
            fq[t], fs[t] = float(q), s
            chosen[s] += 1
            qualities.append(float(q))
        got = [q for q in fq if q is not None]
        if not got:
            no_fused += 1
        extra = {**ann.extra, "quality": float(np.mean(got)) if got else None,
                 "frame_quality": fq, "frame_source": fs}
        out_anns.append(Annotation(id=ann.id, video_id=ann.video_id, category_id=ann.category_id,
                                   segmentations=segs, bboxes=[None if b is None else list(b) for b in ann.bboxes],
                                   areas=areas, iscrowd=ann.iscrowd, extra=extra))
    fused_masks = sum(chosen.values())
    stats: dict[str, Any] = {
        "mode": cfg.mode,
        "sources": order,
        "annotations": len(dataset.annotations),
        "frames_with_box": frames_with_box,
        "fused_masks": fused_masks,
        "frames_without_fused_mask": frames_no_mask + frames_rejected,
        "frames_no_source_mask": frames_no_mask,
        "frames_rejected": frames_rejected,
        "chosen": {s: chosen[s] for s in sorted(chosen)},
        "considered": {s: considered[s] for s in order},
        "scm_dropped": {s: scm_dropped[s] for s in order},
        "empty": {s: empty[s] for s in order},
        "annotations_without_tracks": no_tracks,
        "annotations_without_fused_mask": no_fused,
        "mean_quality": float(np.mean(qualities)) if qualities else None,
    }
    info = {**dataset.info, "fusion": {"config": cfg.model_dump(mode="json"), "stats": stats}}
    fused_ds = YTVISDataset(videos=dataset.videos, annotations=out_anns, categories=dict(dataset.categories),
                            path=None, frames_root=dataset.frames_root, info=info)
    return fused_ds, stats


def fuse_annotations(
    dataset: YTVISDataset,
    raw_tracks: Iterable[RawTrack] | Mapping[int, Mapping[str, RawTrack]],
    config: FuseConfig,
) -> YTVISDataset:
    """The fused pseudo-mask training annotations for ``dataset`` (its GT boxes prompt the fusion).

    Returns a new dataset with the same videos, categories, annotation ids and GT boxes (the box
    stays the trusted box label); ``segmentations`` are the fused pseudo masks and ``areas`` their
    areas. Only frames where the GT has a box get a mask; a frame without a box, or where no source
    survives, is None. Each annotation's ``extra`` gets ``quality`` (mean per-frame quality over
    its fused frames, None if none; usable as a pseudo-mask loss weight), ``frame_quality`` and
    ``frame_source`` (per frame; None where there is no fused mask). ``raw_tracks`` is a list of
    :class:`RawTrack` (as :func:`read_raw` returns) or its :func:`tracks_by_annotation` index.
    Statistics are in ``info["fusion"]["stats"]`` (see :func:`fuse_with_stats`).
    """
    return fuse_with_stats(dataset, raw_tracks, config)[0]
