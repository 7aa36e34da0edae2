"""Batches of training clips: :class:`ClipSampler` draws B clips × T frames from one worker's shard of
the training videos; :meth:`ClipBatch.targets` turns them into the criterion's
:class:`~pmvis.models.vis.FrameTargets` on the training device.

Sampling (IDOL): a key frame with at least one annotated instance (a box), then T−1 reference frames
within ±``reference_range`` of it (without replacement when the window allows; the key frame
repeated when the video has a single usable frame). Frame 0 of a clip is the key frame; the
reference frames follow in time order. Frames listed in any annotation's ``extra["excluded_frames"]``
(written by `pmvis filter`'s Missing-Data ``drop``: the instance is there but unlabelled) are never
sampled in that video, so an instance is never supervised as absent where it is in fact visible.

Augmentation, as IDOL's: with probability ``crop_prob`` each frame gets its own random crop
(``crop``: absolute [lo, hi] pixels); the clip's frames share one short side (drawn uniformly from
``short_side``, long side capped at ``max_size``; ``None`` keeps the native size), resized bilinear
and antialiased like inference (``antialias``), and one horizontal flip (``flip_prob``); boxes and
masks are transformed with the images. A batch is zero-padded bottom/right to a common size that
is a multiple of ``size_divisibility``; ``padding_mask`` is True there.

Determinism: the batch of iteration i on world rank r is a pure function of (seed, r, i): resuming at
iteration i redraws exactly the batches an uninterrupted run would have drawn, and a background
thread may prepare batch i+1 while i trains.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask
from pmvis.models.vis import (
    FrameTargets,
    box_masks_from_boxes,
    lab_images,
    mask_targets,
    normalize_images,
    resize_images,
    valid_masks,
    valid_sizes,
)
from pmvis.platform.data.vis_data import DataConfig, TrainingData
from pmvis.platform.data.ytvis import Annotation


def _has_box(box: Sequence[float] | None) -> bool:
    return box is not None and box[2] > 0 and box[3] > 0


@dataclass
class _VideoIndex:
    video_id: int
    annotations: list[Annotation]  # non-crowd
    key_frames: list[int]  # frames usable as key frame (≥ 1 box, not excluded, masks where needed)
    ref_frames: list[int]  # frames usable as reference frames


def _index_video(video_id: int, length: int, anns: list[Annotation], *, masks_everywhere: bool,
                 masks_on_key: bool) -> _VideoIndex:
    anns = [a for a in anns if not a.iscrowd]
    excluded: set[int] = set()
    for a in anns:
        excluded.update(int(t) for t in (a.extra.get("excluded_frames") or []))

    def masks_complete(t: int) -> bool:
        return all(a.segmentations[t] is not None for a in anns if _has_box(a.bboxes[t]))

    usable = [t for t in range(length) if t not in excluded]
    ref = [t for t in usable if not masks_everywhere or masks_complete(t)]
    key = [t for t in ref if any(_has_box(a.bboxes[t]) for a in anns) and (not masks_on_key or masks_complete(t))]
    return _VideoIndex(video_id, anns, key, ref)


@dataclass(eq=False)
class FrameLabels:
    """The n instances of one frame of a batch, on the CPU, on the padded canvas (H, W).

    ``boxes``: cxcywh normalised by the frame's own size (w, h), not the canvas; ``gt_masks`` /
    ``pseudo_masks``: float ``(n, H/s, W/s)`` targets on the canvas."""

    labels: torch.Tensor
    boxes: torch.Tensor
    instance_ids: torch.Tensor
    gt_masks: torch.Tensor | None = None
    pseudo_masks: torch.Tensor | None = None
    pseudo_weights: torch.Tensor | None = None


@dataclass(eq=False)
class ClipBatch:
    """B clips × T frames, clip-major like the model's input (image b·T + t)."""

    images: torch.Tensor  # (B·T, 3, H, W) uint8 RGB
    padding_mask: torch.Tensor  # (B·T, H, W) bool, True on padding
    labels: list[list[FrameLabels]]  # [b][t]
    video_ids: list[int]
    frame_indices: list[list[int]]  # [b][t] frame numbers in the video
    flipped: list[bool]
    stride: int
    # per image: resized height / original height (BoxInst's bottom_pixels_removed is scaled by it)
    resize_scales: list[float] | None = None

    @property
    def num_frames(self) -> int:
        return len(self.labels[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def model_inputs(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float images, padding mask) on ``device``."""

        return (normalize_images(self.images.to(device, non_blocking=True)),
                self.padding_mask.to(device, non_blocking=True))

    def targets(self, device: torch.device | str, *, bottom_pixels: int) -> list[list[Any]]:
        """``FrameTargets[b][t]`` on ``device``: LAB images and valid masks are computed there."""

        s = self.stride
        images = self.images.to(device, non_blocking=True)
        lab = lab_images(images, s)
        scales = self.resize_scales or [1.0] * images.shape[0]
        # AdelaiDet: int(bottom_pixels_removed · resized height / original height) rows per image
        removed = torch.tensor([int(bottom_pixels * k) for k in scales], device=device)
        valid = valid_masks(self.padding_mask.to(device, non_blocking=True), s, removed)
        sizes = valid_sizes(self.padding_mask).tolist()  # each frame's own (h, w): its boxes' unit
        out: list[list[Any]] = []
        t_frames = self.num_frames
        for b, clip in enumerate(self.labels):
            frames = []
            for t, f in enumerate(clip):
                boxes = f.boxes.to(device)

                def dev(x: torch.Tensor | None) -> torch.Tensor | None:
                    return None if x is None else x.to(device, non_blocking=True)

                frames.append(FrameTargets(
                    labels=f.labels.to(device), boxes=boxes, instance_ids=f.instance_ids.to(device),
                    box_masks=box_masks_from_boxes(boxes, tuple(sizes[b * t_frames + t]), s, self.image_size),
                    images_lab=lab[b * t_frames + t],
                    valid=valid[b * t_frames + t], gt_masks=dev(f.gt_masks), pseudo_masks=dev(f.pseudo_masks),
                    pseudo_weights=dev(f.pseudo_weights)))
            out.append(frames)
        return out


@dataclass
class _Frame:
    image: np.ndarray  # (h, w, 3) uint8, resized and flipped
    labels: list[int]
    boxes: list[list[float]]  # xyxy pixels of the resized, flipped frame
    ids: list[int]
    gt: list[np.ndarray | None] | None
    pseudo: list[np.ndarray | None] | None
    pseudo_w: list[float] | None
    resize_scale: float = 1.0  # resized height / original height


def resize_frame(image: np.ndarray, size: tuple[int, int], *, antialias: bool = True) -> np.ndarray:
    """An RGB uint8 ``(h, w, 3)`` frame resized to ``size`` (h, w) the way inference resizes
    (:func:`~pmvis.models.vis.resize_images`: bilinear, antialiased when shrinking)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = resize_images(x, size, antialias=antialias)
    return x[0].round().to(torch.uint8).permute(1, 2, 0).numpy()


def build_sampler(data: TrainingData, cfg: DataConfig, **kwargs: Any) -> "ClipSampler":
    """The sampler of ``cfg.format``: clips of real videos, or pseudo videos made from stills."""
    if cfg.format == "coco":
        from pmvis.platform.data.pseudo_video import PseudoVideoSampler

        return PseudoVideoSampler(data, cfg, **kwargs)
    return ClipSampler(data, cfg, **kwargs)


class ClipSampler:
    """Batches of clips from one worker's shard of the training videos (videos ``rank::world_size``)."""

    def __init__(
        self,
        data: TrainingData,
        cfg: DataConfig,
        *,
        batch_size: int,
        stride: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        need_gt_masks: bool = False,
        need_pseudo: bool = False,
        pseudo_quality_weighting: bool = False,
        pseudo_divide_by_quality: bool = False,
        pseudo_quality_floor: float = 0.05,
        supervise_all_frames: bool = False,
    ) -> None:
        if batch_size < 1:
            raise PmvisError(f"batch_size must be ≥ 1, got {batch_size}")
        if cfg.size_divisibility % stride:
            raise PmvisError(f"data.size_divisibility {cfg.size_divisibility} must be a multiple of the mask "
                             f"stride {stride}")
        if need_pseudo and data.pseudo is None:
            raise PmvisError("loss mode 'pmvis' needs data.pseudo_annotations (the fused file of `pmvis fuse`)")
        self.data, self.cfg = data, cfg
        self.batch_size, self.stride, self.seed = batch_size, stride, seed
        self.rank, self.world_size = rank, world_size
        self.need_gt_masks, self.need_pseudo = need_gt_masks, need_pseudo
        self.pseudo_quality_weighting = pseudo_quality_weighting
        self.pseudo_divide_by_quality = pseudo_divide_by_quality
        self.pseudo_quality_floor = pseudo_quality_floor
        self.label_of = {cid: i for i, cid in enumerate(data.category_ids)}
        by_video = data.dataset.annotations_by_video()
        usable = []
        for vid in data.train_videos:
            idx = _index_video(vid, data.dataset.videos[vid].length, by_video[vid],
                               masks_everywhere=need_gt_masks and supervise_all_frames, masks_on_key=need_gt_masks)
            if idx.key_frames:
                usable.append(idx)
        if not usable:
            raise PmvisError(f"{data.dataset.path}: no training video has a usable key frame (a frame with a box"
                             + (" and masks for every boxed instance" if need_gt_masks else "") + ")")
        if len(usable) < world_size:
            raise PmvisError(f"{len(usable)} training videos cannot be sharded over {world_size} workers; "
                             "use fewer workers or more videos")
        self.videos = usable[rank::world_size]
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    @property
    def video_ids(self) -> list[int]:
        return [v.video_id for v in self.videos]

    def pseudo_weight(self, pseudo: Annotation, frame: int) -> float:
        """The loss weight of ``pseudo``'s mask on ``frame``: 1; its quality (``pseudo_quality_weighting``);
        or 1 / max(quality, floor) (``pseudo_divide_by_quality``, the PM-VIS authors' ÷ SAM IoU). The
        quality is the frame's (``frame_quality`` of `pmvis fuse`) where recorded, else the track's;
        none recorded: 1 (a missing quality says nothing, so it neither up- nor down-weights)."""
        if not (self.pseudo_quality_weighting or self.pseudo_divide_by_quality):
            return 1.0
        per_frame = pseudo.extra.get("frame_quality")
        q = per_frame[frame] if isinstance(per_frame, list) and frame < len(per_frame) else None
        q = pseudo.extra.get("quality") if q is None else q
        if q is None:
            return 1.0
        return 1.0 / max(float(q), self.pseudo_quality_floor) if self.pseudo_divide_by_quality else float(q)

    # -- sampling ------------------------------------------------------------------------------

    def rng(self, iteration: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, iteration])

    def sample_frames(self, video: _VideoIndex, rng: np.random.Generator) -> list[int]:
        """Key frame first, then T−1 reference frames within the range, in time order."""
        key = int(rng.choice(video.key_frames))
        r = self.cfg.reference_range
        pool = [t for t in video.ref_frames if t != key and abs(t - key) <= r]
        need = self.cfg.clip_frames - 1
        if not pool:
            refs = [key] * need
        else:
            refs = sorted(int(t) for t in rng.choice(pool, size=need, replace=len(pool) < need))
        return [key] + refs

    def draw_short_side(self, rng: np.random.Generator) -> int | None:
        """The clip's short side, uniform in ``short_side`` (None: native size)."""
        lo_hi = self.cfg.short_side
        return None if lo_hi is None else int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    def resized(self, height: int, width: int, short: int | None) -> tuple[int, int]:
        """A ``height`` × ``width`` frame's size with its short side ``short``, long side capped."""
        scale = 1.0 if short is None else short / min(height, width)
        if self.cfg.max_size is not None and max(height, width) * scale > self.cfg.max_size:
            scale = self.cfg.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def target_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        return self.resized(height, width, self.draw_short_side(rng))

    def draw_crops(self, height: int, width: int, count: int,
                   rng: np.random.Generator) -> list[tuple[int, int, int, int]] | None:
        """IDOL's random crop: with probability ``crop_prob`` every frame of the clip gets its own crop
        (x0, y0, w, h) of the original frame, w and h uniform in ``crop`` (absolute pixels, detectron2's
        ``RandomCrop("absolute_range")``, capped at the frame); None: no crop for this clip."""
        if self.cfg.crop is None or not rng.random() < self.cfg.crop_prob:
            return None
        lo, hi = self.cfg.crop
        crops = []
        for _ in range(count):
            ch = int(rng.integers(min(height, lo), min(height, hi) + 1))
            cw = int(rng.integers(min(width, lo), min(width, hi) + 1))
            crops.append((int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch))
        return crops

    def batch(self, iteration: int) -> ClipBatch:
        """The batch of ``iteration`` (a pure function of seed, rank and iteration)."""
        rng = self.rng(iteration)
        clips = []
        for _ in range(self.batch_size):
            video = self.videos[int(rng.integers(len(self.videos)))]
            frames = self.sample_frames(video, rng)
            v = self.data.dataset.videos[video.video_id]
            short = self.draw_short_side(rng)
            flip = bool(rng.random() < self.cfg.flip_prob)
            crops = self.draw_crops(v.height, v.width, len(frames), rng)
            clips.append((video, frames, short, flip, crops))
        return self.collate([self.load_clip(video, frames, short, flip, crops)
                             for video, frames, short, flip, crops in clips],
                            [c[0].video_id for c in clips], [c[1] for c in clips], [c[3] for c in clips])

    # -- prefetching ---------------------------------------------------------------------------

    def get(self, iteration: int, *, prefetch_next: bool = True) -> ClipBatch:
        """``batch(iteration)``, prepared in the background when the previous call asked for it."""
        if not self.cfg.prefetch:
            return self.batch(iteration)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pmvis-clips")
        future = self._pending.pop(iteration, None)
        for stale in self._pending.values():
            stale.cancel()
        self._pending.clear()
        if prefetch_next:
            self._pending[iteration + 1] = self._executor.submit(self.batch, iteration + 1)
        return future.result() if future is not None else self.batch(iteration)

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # -- loading -------------------------------------------------------------------------------

    def load_clip(self, video: _VideoIndex, frames: list[int], short: int | None, flip: bool,
                  crops: list[tuple[int, int, int, int]] | None = None) -> list[_Frame]:
        """The clip's frames: cropped (``crops``: per frame (x0, y0, w, h) of the original, or None),
        resized to the short side ``short`` (shared by the clip, as IDOL's ``choice_by_clip``) and
        flipped; boxes are clipped to the crop, and an instance whose box leaves it is dropped."""
        ds = self.data.dataset
        v = ds.videos[video.video_id]
        out = []
        for k, t in enumerate(frames):
            x0c, y0c, cw, ch = crops[k] if crops is not None else (0, 0, v.width, v.height)
            h, w = self.resized(ch, cw, short)
            sx, sy = w / cw, h / ch

            def transform_mask(rle: dict | None) -> np.ndarray | None:
                if rle is None:
                    return None
                m = decode_mask(rle).astype(np.uint8)[y0c:y0c + ch, x0c:x0c + cw]
                if (h, w) != m.shape:
                    m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
                return np.ascontiguousarray(m[:, ::-1]) if flip else m

            image = ds.read_frame(video.video_id, t)[y0c:y0c + ch, x0c:x0c + cw]
            image = resize_frame(image, (h, w), antialias=self.cfg.antialias)
            if flip:
                image = image[:, ::-1]
            labels, boxes, ids, gt, pseudo, pseudo_w = [], [], [], [], [], []
            for a in video.annotations:
                box = a.bboxes[t]
                if not _has_box(box):
                    continue
                x0, y0 = (box[0] - x0c) * sx, (box[1] - y0c) * sy
                x1, y1 = (box[0] + box[2] - x0c) * sx, (box[1] + box[3] - y0c) * sy
                if flip:
                    x0, x1 = w - x1, w - x0
                x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
                y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
                if x1 <= x0 or y1 <= y0:
                    continue
                labels.append(self.label_of[a.category_id])
                boxes.append([x0, y0, x1, y1])
                ids.append(a.id)
                if self.need_gt_masks:
                    gt.append(transform_mask(a.segmentations[t]))
                if self.need_pseudo:
                    p = self.data.pseudo.get(a.id) if self.data.pseudo is not None else None
                    rle = p.segmentations[t] if p is not None else None
                    pseudo.append(transform_mask(rle))
                    pseudo_w.append(self.pseudo_weight(p, t) if rle is not None else 0.0)
            out.append(_Frame(np.ascontiguousarray(image), labels, boxes, ids,
                              gt if self.need_gt_masks else None,
                              pseudo if self.need_pseudo else None, pseudo_w if self.need_pseudo else None,
                              resize_scale=h / ch))
        return out

    def collate(self, clips: list[list[_Frame]], video_ids: list[int], frame_indices: list[list[int]],
                flipped: list[bool]) -> ClipBatch:

        div, s = self.cfg.size_divisibility, self.stride
        max_h = max(f.image.shape[0] for c in clips for f in c)
        max_w = max(f.image.shape[1] for c in clips for f in c)
        H, W = math.ceil(max_h / div) * div, math.ceil(max_w / div) * div
        n_images = sum(len(c) for c in clips)
        images = torch.zeros(n_images, 3, H, W, dtype=torch.uint8)
        padding = torch.ones(n_images, H, W, dtype=torch.bool)
        labels: list[list[FrameLabels]] = []
        i = 0
        for clip in clips:
            frames = []
            for f in clip:
                h, w = f.image.shape[:2]
                images[i, :, :h, :w] = torch.from_numpy(f.image).permute(2, 0, 1)
                padding[i, :h, :w] = False
                n = len(f.labels)
                # normalised by the frame's own size, not the canvas (which depends on the batch)
                scale = torch.tensor([w, h, w, h], dtype=torch.float32)
                xyxy = torch.tensor(f.boxes, dtype=torch.float32).reshape(n, 4) / scale
                boxes = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                                     xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=1)

                def canvas(masks: list[np.ndarray | None]) -> tuple[torch.Tensor, list[bool]]:
                    full = torch.zeros(n, H, W, dtype=torch.bool)
                    present = []
                    for k, m in enumerate(masks):
                        present.append(m is not None)
                        if m is not None:
                            full[k, :h, :w] = torch.from_numpy(m.astype(bool))
                    return mask_targets(full, s, self.cfg.mask_targets), present

                gt = None
                if f.gt is not None:
                    gt_t, present = canvas(f.gt)
                    gt = gt_t if all(present) else None  # only a frame with every mask can supervise masks
                pseudo = pseudo_w = None
                if f.pseudo is not None:
                    pseudo, _ = canvas(f.pseudo)
                    pseudo_w = torch.tensor(f.pseudo_w, dtype=torch.float32).reshape(n)
                frames.append(FrameLabels(labels=torch.tensor(f.labels, dtype=torch.long).reshape(n), boxes=boxes,
                                          instance_ids=torch.tensor(f.ids, dtype=torch.long).reshape(n),
                                          gt_masks=gt, pseudo_masks=pseudo, pseudo_weights=pseudo_w))
                i += 1
            labels.append(frames)
        return ClipBatch(images=images, padding_mask=padding, labels=labels, video_ids=video_ids,
                         frame_indices=frame_indices, flipped=flipped, stride=s,
                         resize_scales=[f.resize_scale for c in clips for f in c])
