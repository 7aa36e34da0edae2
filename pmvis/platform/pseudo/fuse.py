"""PM-VIS fusion over a dataset: the raw pseudo-mask store's tracks → one mask per annotation frame.

The per-frame mechanisms (DOOB, SCM, SHQM, weighted vote) and their knobs are defined in
:mod:`pmvis.models.fusion`; this module applies them to every annotation of a YTVIS dataset,
on compressed RLEs, and counts what happened.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pmvis.core.errors import PmvisError
from pmvis.core.masks import Rle, encode_mask, from_coco_rle, rle_areas, to_coco_rle, to_coco_rles
from pmvis.models.fusion import (
    MAX_LISTED,
    MAX_RLE_VOTERS,
    FuseConfig,
    box_iou,
    confidence_or_zero,
    doob_window,
    rect_rle,
    scm_keep,
    vote_masks,
    vote_rle,
)
from pmvis.platform.data.ytvis import Annotation, YTVISDataset
from pmvis.platform.pseudo.store import RawMasks, raw_masks_by_annotation

TrackIndex = dict[int, dict[str, RawMasks]]


def index_tracks(
    dataset: YTVISDataset,
    raw_tracks: Iterable[RawMasks] | Mapping[int, Mapping[str, RawMasks]],
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
        by_ann = raw_masks_by_annotation(raw_tracks)
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
        shown = ", ".join(str(i) for i in unknown[:MAX_LISTED])
        more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
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
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PmvisError("raw pseudo masks disagree with the dataset:\n  "
                         + "\n  ".join(problems[:MAX_LISTED]) + more)
    return by_ann, order


def fuse_with_stats(
    dataset: YTVISDataset,
    raw_tracks: Iterable[RawMasks] | Mapping[int, Mapping[str, RawMasks]],
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
                conf = confidence_or_zero(tracks[s].confidences[t])
                if cfg.weight(s) <= 0:
                    continue
                if not scm_keep(conf, s, cfg):
                    scm_dropped[s] += 1
                    continue
                coco = to_coco_rles([rle])[0]
                if window is not None:
                    if box_rle is None:
                        box_rle = rect_rle(window, H, W)
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
                elif 0 < len(survivors) <= MAX_RLE_VOTERS:
                    fused = vote_rle([(s, coco, conf) for s, coco, conf, _ in survivors], box, cfg)
                elif survivors:
                    r = vote_masks({s: (mask_utils.decode(coco).astype(bool), conf)
                                    for s, coco, conf, _ in survivors}, box, cfg)
                    if r is not None:
                        enc = to_coco_rle(encode_mask(r.mask))
                        fused = (enc, r.quality, r.source)
            if fused is None:
                frames_rejected += 1
                continue
            coco, q, s = fused
            segs[t] = from_coco_rle(coco)
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
    raw_tracks: Iterable[RawMasks] | Mapping[int, Mapping[str, RawMasks]],
    config: FuseConfig,
) -> YTVISDataset:
    """The fused pseudo-mask training annotations for ``dataset`` (its GT boxes prompt the fusion).

    Returns a new dataset with the same videos, categories, annotation ids and GT boxes (the box
    stays the trusted box label); ``segmentations`` are the fused pseudo masks and ``areas`` their
    areas. Only frames where the GT has a box get a mask; a frame without a box, or where no source
    survives, is None. Each annotation's ``extra`` gets ``quality`` (mean per-frame quality over
    its fused frames, None if none; usable as a pseudo-mask loss weight), ``frame_quality`` and
    ``frame_source`` (per frame; None where there is no fused mask). ``raw_tracks`` is a list of
    :class:`RawMasks` (as :func:`read_raw` returns) or its :func:`raw_masks_by_annotation` index.
    Statistics are in ``info["fusion"]["stats"]`` (see :func:`fuse_with_stats`).
    """
    return fuse_with_stats(dataset, raw_tracks, config)[0]
