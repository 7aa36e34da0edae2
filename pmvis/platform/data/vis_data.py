"""Training clips for the VIS model from any YouTube-VIS file: ground truth, the fused pseudo masks of
`pmvis fuse`, or the cleaned ground truth of `pmvis filter`.

:func:`load_training_data` reads and cross-checks the files once (train annotations, optional pseudo
file, optional evaluation file) and splits the videos into train / held-out (deterministic by
``split_seed``); :mod:`pmvis.platform.data.clips` draws the training batches from it. Labels are
0-based indices into the training file's categories sorted by id (:attr:`TrainingData.category_ids`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from pmvis.core.config import StrictConfig
from pmvis.core.errors import PmvisError
from pmvis.platform.data.ytvis import Annotation, YTVISDataset
from pmvis.platform.data.ytvis_io import load_dataset_dir, load_ytvis

logger = logging.getLogger(__name__)


class PseudoVideoConfig(StrictConfig):
    """How a still becomes the frames of a pseudo video (``data.format: coco``; drawn per frame,
    :mod:`pmvis.platform.data.pseudo_video`)."""

    scale: tuple[float, float] = (0.8, 1.25)  # zoom factor drawn log-uniformly in [lo, hi]
    translate: float = Field(0.1, ge=0.0, le=0.5)  # shift, uniform in ±translate × (w, h)
    rotate: float = Field(0.0, ge=0.0, le=180.0)  # rotation in degrees, uniform in ±rotate
    min_visible: float = Field(0.3, ge=0.0, le=1.0)  # kept fraction of a transformed box's area
    min_box_px: float = Field(2.0, ge=0.0)  # a visible box thinner than this (pixels) is dropped

    @model_validator(mode="after")
    def _check(self) -> "PseudoVideoConfig":
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be [lo, hi] with 0 < lo ≤ hi, got {list(self.scale)}")
        return self


class DataConfig(StrictConfig):
    """Where the clips come from and how they are sampled and augmented."""

    data_dir: str  # the dataset directory (annotations + JPEGImages/); workers must see the same path
    annotations: str = "annotations.json"  # training annotations, relative to data_dir or absolute
    # "ytvis": a YouTube-VIS/OVIS video set; "coco": a COCO instances file of still images, each
    # turned into a pseudo video (IDOL's COCO pretraining, pmvis.platform.pseudo_video)
    format: Literal["ytvis", "coco"] = "ytvis"
    image_dir: str = "images"  # format coco: the images' directory, relative to data_dir or absolute
    pseudo_video: PseudoVideoConfig = Field(default_factory=PseudoVideoConfig)  # format coco only
    # A fused file of `pmvis fuse` (same annotation ids; segmentations = pseudo masks, extra["quality"])
    pseudo_annotations: str | None = None
    # Ground truth the held-out videos are scored against (default: the training annotations).
    eval_annotations: str | None = None
    clip_frames: int = Field(2, ge=2)  # T: the key frame + T−1 reference frames
    reference_range: int = Field(10, ge=1)  # reference frames within ±range of the key frame (IDOL)
    # Short side drawn uniformly from [lo, hi] per clip (docs/design.md §4.3: 320–640); None: native size.
    short_side: tuple[int, int] | None = (320, 640)
    max_size: int | None = Field(768, ge=32)  # cap on the long side after resizing (IDOL YTVIS: 768)
    size_divisibility: int = Field(32, ge=4)  # padded canvas multiple (a multiple of the mask stride)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    # IDOL's random crop: with probability crop_prob each frame of a clip gets its own crop of the
    # original frame, height and width uniform in [lo, hi] pixels (capped at the frame), before the
    # resize; None: never crop (ytvis only; the pseudo videos of format coco have their own views)
    crop: tuple[int, int] | None = (384, 600)
    crop_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Antialias a downscaled frame (bilinear, as inference does and as PIL does in IDOL's detectron2
    # resize); False: plain bilinear, pmvis's training resize before paper parity.
    antialias: bool = True
    # How GT / pseudo masks become stride-s mask targets (pmvis.models.vis.targets.mask_targets):
    # "point" samples one pixel per cell (CondInst), "area" is the covered share of the cell's window
    # (soft, keeps sub-cell boundaries: what small objects at stride 4 need).
    mask_targets: Literal["point", "area"] = "point"
    # Pretraining on another label set (IDOL-style COCO → YouTube-VIS/OVIS, the maps VITA and the PM-VIS
    # authors use; presets coco_to_*.yaml): each annotation's category id → the target dataset's id,
    # annotations of unmapped categories dropped; the model's classes are then target_categories
    # (every id of the target dataset, sorted: class i = the i-th), not just the ids the map reaches.
    category_map: dict[int, int] | None = None
    target_categories: list[int] | None = None
    # Held-out videos for the end-of-training evaluation: an explicit list, else a fraction of the
    # training file's videos drawn with split_seed (at least one video when the fraction is > 0).
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    val_videos: list[int] | None = None
    split_seed: int = Field(0, ge=0)  # numpy's generators take no negative seeds
    prefetch: bool = True  # prepare the next batch in a background thread while this one trains

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.crop is not None and not 1 <= self.crop[0] <= self.crop[1]:
            raise ValueError(f"crop must be [lo, hi] with 1 ≤ lo ≤ hi, got {list(self.crop)}")
        if (self.category_map is None) != (self.target_categories is None):
            raise ValueError("category_map and target_categories go together (the map and every target id)")
        if self.category_map is not None:
            unknown = sorted(set(self.category_map.values()) - set(self.target_categories))
            if unknown or len(set(self.target_categories)) != len(self.target_categories):
                raise ValueError(f"target_categories must be unique and hold every mapped id; missing {unknown}")
        if self.short_side is not None:
            lo, hi = self.short_side
            if not 1 <= lo <= hi:
                raise ValueError(f"short_side must be [lo, hi] with 1 ≤ lo ≤ hi, got {list(self.short_side)}")
        return self


# ----------------------------------------------------------------------------- loading + split


def resolve_data_path(data_dir: str | Path, name: str | Path) -> Path:
    """A file given relative to the dataset directory, or absolute."""
    p = Path(name)
    return p if p.is_absolute() else Path(data_dir) / p


def split_videos(video_ids: Sequence[int], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) video ids, both sorted; deterministic by ``cfg.split_seed``."""
    ids = sorted(video_ids)
    if cfg.val_videos is not None:
        unknown = sorted(set(cfg.val_videos) - set(ids))
        if unknown:
            raise PmvisError(f"data.val_videos: video ids {unknown} are not in the training annotations")
        val = sorted(set(cfg.val_videos))
    elif cfg.val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(1, round(cfg.val_fraction * len(ids))), len(ids) - 1)
        rng = np.random.default_rng(cfg.split_seed)
        val = sorted(int(v) for v in rng.choice(ids, size=n_val, replace=False))
    else:
        val = []
    train = [v for v in ids if v not in set(val)]
    if not train:
        raise PmvisError("data: every video is held out for evaluation; no training videos are left")
    return train, val


@dataclass
class TrainingData:
    """The training file, the optional pseudo masks by annotation id, the category map and the split."""

    dataset: YTVISDataset
    pseudo: dict[int, Annotation] | None
    category_ids: list[int]  # label index → category id (the training file's ids, sorted)
    train_videos: list[int]
    val_videos: list[int]
    eval_gt: YTVISDataset | None = None  # ground truth of the held-out videos (None: nothing held out)


def _check_pseudo(train: YTVISDataset, pseudo: YTVISDataset) -> dict[int, Annotation]:
    where = str(pseudo.path)
    problems: list[str] = []
    for vid, v in pseudo.videos.items():
        t = train.videos.get(vid)
        if t is None:
            problems.append(f"video id={vid}: not in the training annotations {train.path}")
        elif (t.width, t.height, t.length) != (v.width, v.height, v.length):
            problems.append(f"video id={vid}: {v.width}x{v.height}x{v.length} frames, the training file says "
                            f"{t.width}x{t.height}x{t.length}")
    by_id = {a.id: a for a in train.annotations}
    out: dict[int, Annotation] = {}
    for a in pseudo.annotations:
        ref = by_id.get(a.id)
        if ref is None:
            problems.append(f"annotation id={a.id}: not in the training annotations")
        elif ref.video_id != a.video_id:
            problems.append(f"annotation id={a.id}: video id={a.video_id}, the training file says {ref.video_id}")
        else:
            out[a.id] = a
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise PmvisError(f"{where}: the pseudo-mask file does not match the training annotations:\n  {shown}")
    return out


def remap_categories(dataset: YTVISDataset, category_map: dict[int, int], targets: list[int]) -> YTVISDataset:
    """``dataset`` with its annotations' categories mapped (unmapped ones dropped) and the target ids as
    its categories; a map that reaches no annotation is a PmvisError (the wrong file or map)."""
    unknown = sorted(set(category_map) - set(dataset.categories))
    if unknown:
        raise PmvisError(f"{dataset.path}: data.category_map names category ids {unknown} the file does not have")
    anns = [dataclasses.replace(a, category_id=category_map[a.category_id]) for a in dataset.annotations
            if a.category_id in category_map]
    if not anns:
        raise PmvisError(f"{dataset.path}: data.category_map keeps none of the {len(dataset.annotations)} annotations")
    names = {t: ", ".join(dataset.categories[c] for c, v in category_map.items() if v == t) or f"category {t}"
             for t in targets}
    return dataclasses.replace(dataset, annotations=anns, categories=dict(sorted(names.items())))


def load_training_data(cfg: DataConfig, *, num_classes: int | None = None, need_gt_masks: bool = False,
                       need_pseudo: bool = False, load_eval: bool = True) -> TrainingData:
    """Load and cross-check the files of ``cfg``; every problem is a PmvisError naming the file."""
    if cfg.format == "coco":
        from pmvis.platform.data.coco import load_coco_stills

        if need_pseudo or cfg.pseudo_annotations is not None:
            raise PmvisError("data.format 'coco' (still images) has no pseudo-mask file: use loss.mode boxinst or full")
        dataset = load_coco_stills(resolve_data_path(cfg.data_dir, cfg.annotations),
                                   resolve_data_path(cfg.data_dir, cfg.image_dir))
    else:
        dataset = load_dataset_dir(cfg.data_dir, cfg.annotations)
    if cfg.category_map is not None:
        dataset = remap_categories(dataset, cfg.category_map, cfg.target_categories)
    if not dataset.categories:
        raise PmvisError(f"{dataset.path}: no categories")
    category_ids = sorted(dataset.categories)
    if num_classes is not None and num_classes != len(category_ids):
        raise PmvisError(f"{dataset.path}: {len(category_ids)} categories but model.num_classes is {num_classes}; "
                         f"set model.num_classes: {len(category_ids)} (class i = the i-th category by id)")
    if need_gt_masks and not any(s is not None for a in dataset.annotations for s in a.segmentations):
        raise PmvisError(f"{dataset.path}: loss mode 'full' needs mask annotations, but the file has none "
                         "(box-only file: use loss.mode boxinst or pmvis)")
    pseudo = None
    if cfg.pseudo_annotations is not None:
        pseudo = _check_pseudo(dataset, load_ytvis(resolve_data_path(cfg.data_dir, cfg.pseudo_annotations)))
    elif need_pseudo:
        raise PmvisError("loss mode 'pmvis' needs data.pseudo_annotations (the fused file of `pmvis fuse`)")
    train, val = split_videos(list(dataset.videos), cfg)
    eval_gt = None
    if val and load_eval:
        gt = dataset
        if cfg.eval_annotations is not None:
            gt = load_dataset_dir(cfg.data_dir, cfg.eval_annotations)
            missing = sorted(set(val) - set(gt.videos))
            if missing:
                raise PmvisError(f"{gt.path}: held-out video ids {missing[:10]} are not in the evaluation file")
            if sorted(gt.categories) != category_ids:
                raise PmvisError(f"{gt.path}: categories {sorted(gt.categories)} differ from the training file's "
                                 f"{category_ids}")
        eval_gt = gt.subset(val)
    return TrainingData(dataset=dataset, pseudo=pseudo, category_ids=category_ids, train_videos=train,
                        val_videos=val, eval_gt=eval_gt)
