"""Pseudo videos from still images (IDOL's COCO pretraining): one still → a clip of T frames.

IDOL pretrains on COCO by turning each image into a short clip whose frames are independent
random augmentations of the same image, so the tracking (contrastive) loss sees the "same
instance in another frame" and the detector sees more views. pmvis does the same for any
training set whose videos have one frame (``data.format: coco``, :mod:`pmvis.platform.data.coco`):
frame t of a clip is the still under a random similarity transform — a zoom around a random
centre and a shift, optionally a rotation — drawn per frame (:class:`PseudoVideoConfig`), then
the clip's common resize and flip.

Labels follow the pixels: a box is the bounding box of its transformed corners (or, when the
instance has a mask, of its transformed mask: tight even under rotation), clipped to the frame;
an instance whose visible box keeps less than ``min_visible`` of its transformed area, or is
thinner than ``min_box_px``, is dropped from that frame, as an object leaving a real video.
Instance ids are kept across the clip's frames. Everything is a pure function of (seed, rank,
iteration), like :class:`pmvis.platform.data.vis_data.ClipSampler`'s batches.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pmvis.core.masks import decode_mask
from pmvis.platform.data.clips import ClipBatch, ClipSampler, _Frame, _has_box, _VideoIndex
from pmvis.platform.data.vis_data import PseudoVideoConfig


def random_similarity(rng: np.random.Generator, cfg: PseudoVideoConfig, height: int, width: int) -> np.ndarray:
    """A 2×3 affine matrix (pixels → pixels of the same-size frame): zoom + rotation about a
    random point near the centre, then a shift."""
    lo, hi = cfg.scale
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    angle = rng.uniform(-cfg.rotate, cfg.rotate) if cfg.rotate > 0 else 0.0
    cx = width / 2 + rng.uniform(-cfg.translate, cfg.translate) * width
    cy = height / 2 + rng.uniform(-cfg.translate, cfg.translate) * height
    m = cv2.getRotationMatrix2D((cx, cy), angle, s)
    m[0, 2] += width / 2 - cx  # bring the chosen point to the centre: a shift of the view
    m[1, 2] += height / 2 - cy
    return m


def transform_box(box_xyxy: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The bounding box of a box's four corners under the affine ``m``."""
    x0, y0, x1, y1 = box_xyxy
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], dtype=np.float64)
    pts = corners @ m.T
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])


class PseudoVideoSampler(ClipSampler):
    """:class:`ClipSampler` over one-frame videos: every frame of a clip is a new random view of
    the still (:mod:`pmvis.platform.data.pseudo_video`), with the knobs of ``data.pseudo_video``."""

    @property
    def pseudo_video(self) -> PseudoVideoConfig:
        return self.cfg.pseudo_video

    def batch(self, iteration: int) -> ClipBatch:
        rng = self.rng(iteration)
        clips, video_ids, frame_indices, flipped = [], [], [], []
        for _ in range(self.batch_size):
            video = self.videos[int(rng.integers(len(self.videos)))]
            v = self.data.dataset.videos[video.video_id]
            size = self.target_size(v.height, v.width, rng)
            flip = bool(rng.random() < self.cfg.flip_prob)
            key = int(rng.choice(video.key_frames))
            views = [random_similarity(rng, self.pseudo_video, v.height, v.width)
                     for _ in range(self.cfg.clip_frames)]
            clips.append(self.load_views(video, key, views, size, flip))
            video_ids.append(video.video_id)
            frame_indices.append([key] * self.cfg.clip_frames)
            flipped.append(flip)
        return self.collate(clips, video_ids, frame_indices, flipped)

    def load_views(self, video: _VideoIndex, frame: int, views: list[np.ndarray], size: tuple[int, int],
                   flip: bool) -> list[_Frame]:
        """Frame ``frame`` of ``video`` under each affine view, resized to ``size`` and flipped."""
        ds = self.data.dataset
        v = ds.videos[video.video_id]
        h, w = size
        image = ds.read_frame(video.video_id, frame)
        resize = np.diag([w / v.width, h / v.height, 1.0])
        flip_m = np.array([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
        anns = [a for a in video.annotations if _has_box(a.bboxes[frame])]
        masks = {}
        if self.need_gt_masks or any(a.segmentations[frame] is not None for a in anns):
            masks = {a.id: decode_mask(a.segmentations[frame]).astype(np.uint8)
                     for a in anns if a.segmentations[frame] is not None}
        out = []
        pv = self.pseudo_video
        for view in views:
            m = (flip_m @ resize @ np.vstack([view, [0, 0, 1]]))[:2]
            frame_image = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                         borderValue=(0, 0, 0))
            labels, boxes, ids, gt = [], [], [], []
            for a in anns:
                bx, by, bw, bh = a.bboxes[frame]
                mask = None
                if a.id in masks:
                    mask = cv2.warpAffine(masks[a.id], m, (w, h), flags=cv2.INTER_NEAREST)
                    ys, xs = np.nonzero(mask)
                    if not len(xs):
                        continue
                    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
                    visible = mask.sum() / max(masks[a.id].sum() * abs(np.linalg.det(m[:, :2])), 1e-9)
                else:
                    full = transform_box(np.array([bx, by, bx + bw, by + bh]), m)
                    box = np.clip(full, 0, [w, h, w, h])
                    visible = _area(box) / max(_area(full), 1e-9)
                if visible < pv.min_visible or min(box[2] - box[0], box[3] - box[1]) < pv.min_box_px:
                    continue
                labels.append(self.label_of[a.category_id])
                boxes.append([float(b) for b in box])
                ids.append(a.id)
                if self.need_gt_masks:
                    gt.append(mask)
            out.append(_Frame(np.ascontiguousarray(frame_image), labels, boxes, ids,
                              gt if self.need_gt_masks else None, None, None, resize_scale=h / v.height))
        return out


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))
