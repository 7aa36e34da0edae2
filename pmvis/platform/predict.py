"""Predictions over a dataset: a trained model's tracks as YTVIS results, and the "filled box as
mask" baseline, the floor every box-supervised method must beat.

Per-video inference (the model, the memory-bank association) is :mod:`pmvis.models.vis.inference`;
this module maps class indices to the dataset's category ids and loops over videos."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm import tqdm

from pmvis.core.errors import PmvisError
from pmvis.core.masks import box_mask_rle
from pmvis.models.vis.inference import InferenceConfig, Track, check_category_ids, predict_video
from pmvis.platform.data.ytvis import Result, YTVISDataset

log = logging.getLogger(__name__)

BASELINE_SCORE = 1.0


def filled_box_results(dataset: YTVISDataset) -> list[Result]:
    """One result per annotation whose mask in each frame is its filled ground-truth box."""
    results = []
    for ann in dataset.annotations:
        video = dataset.videos[ann.video_id]
        segs = [None if box is None else box_mask_rle(box, video.height, video.width) for box in ann.bboxes]
        results.append(Result(video_id=ann.video_id, category_id=ann.category_id, score=BASELINE_SCORE,
                              segmentations=segs))
    return results


def annotations_as_results(dataset: YTVISDataset) -> list[Result]:
    """The annotation masks as predictions, to score an annotation file against the truth."""
    return [Result(video_id=a.video_id, category_id=a.category_id, score=BASELINE_SCORE,
                   segmentations=list(a.segmentations)) for a in dataset.annotations]


def resolve_category_ids(state: dict | None, dataset: YTVISDataset, num_classes: int) -> list[int]:
    """Class index → dataset category id: the checkpoint's ``extra["category_ids"]`` (recorded by
    training); without it, the dataset's category ids sorted ascending (a logged warning). Ids not
    in the dataset, or a count other than the model's classes, are a PmvisError."""
    extra = (state or {}).get("extra") or {}
    where = (state or {}).get("path", "checkpoint")
    ids = extra.get("category_ids")
    if ids is None:
        ids = sorted(dataset.categories)
        log.warning("%s records no category_ids: assuming class i is the i-th smallest dataset category id %s",
                    where, ids)
    return check_category_ids(ids, dataset, num_classes, where=str(where))


def tracks_to_results(tracks: Sequence[Track], video_id: int, length: int, category_ids: Sequence[int],
                      cfg: InferenceConfig | None = None) -> list[Result]:
    """The results of a video's tracks: one per (track, class) of :meth:`Track.class_results`
    (IDOL's multi-class output by default), sharing the track's masks."""
    cfg = cfg or InferenceConfig()
    out = []
    for tr in tracks:
        segmentations = tr.segmentations(length)
        out.extend(Result(video_id=video_id, category_id=int(category_ids[label]), score=score,
                          segmentations=segmentations) for label, score in tr.class_results(cfg))
    return out


def predict_dataset(
    model: torch.nn.Module,
    dataset: YTVISDataset,
    cfg: InferenceConfig | None = None,
    *,
    category_ids: Sequence[int] | None = None,
    video_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> list[Result]:
    """YTVIS results (per track: one per class, :func:`tracks_to_results`) for ``video_ids``
    (default: every video) of ``dataset``.

    ``category_ids`` maps class index → category id (training stores it in the checkpoint,
    ``state["extra"]["category_ids"]``; see :func:`resolve_category_ids`); None: the dataset's
    category ids sorted ascending, with a warning.
    """
    cfg = cfg or InferenceConfig()
    num_classes = model.cfg.num_classes
    if category_ids is None:
        category_ids = resolve_category_ids(None, dataset, num_classes)
    else:
        category_ids = check_category_ids(category_ids, dataset, num_classes)
    vids = sorted(dataset.videos) if video_ids is None else list(video_ids)
    unknown = [v for v in vids if v not in dataset.videos]
    if unknown:
        raise PmvisError(f"{dataset.path}: video ids {unknown} are not in the dataset")
    results: list[Result] = []
    for vid in tqdm(vids, desc="predict", unit="video", disable=not progress):
        video = dataset.videos[vid]
        tracks = predict_video(model, dataset.read_video(vid), cfg)
        results.extend(tracks_to_results(tracks, vid, video.length, category_ids, cfg))
    return results
