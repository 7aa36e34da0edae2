"""Deterministic synthetic YouTube-VIS datasets with known ground truth and known annotation defects.

Each video has a textured background (gradient + smoothed colour noise + random lines and blobs, some
in the objects' own colours, so no single colour threshold separates objects) and 1..N moving,
scaling, rotating objects. Each category is a distinct shape with a distinct texture and palette
(disc/stripes/red, square/checker/blue, triangle/speckle/green, ring/angular gradient/purple,
cross/dots/yellow), so a model can learn category from appearance. Objects are drawn in list order
(later on top); an object's mask is its VISIBLE part. Some objects enter or leave the frame, some
are aimed at an earlier object so that they occlude it.

Written to ``out_dir``:
- ``JPEGImages/video_0001/00000.jpg``...: the frames.
- ``truth.json``: the YTVIS file with the true visible masks (compressed RLE); an entry is ``null``
  where the object is out of frame or fewer than ``min_visible_pixels`` of it are visible.
- ``annotations.json``: the same file (same ids) as a user would have it, with injected defects.
- ``defects.json``: ``[{video_id, annotation_id, frame, kind, detail}]`` (``frame`` is 0-based).

Design decision: defects corrupt MASKS only. An ``inaccurate`` frame keeps the TRUE box (the box is
the label the platform trusts) and its area is the defective mask's area; its mask is eroded,
dilated, shifted or cut by a half-plane, differs from the truth (IoU <= ``inaccurate_max_iou``),
is non-empty and inside the image. A ``missing`` frame has segmentation, box and area all ``null``
although the object is visible; an annotation never loses all its frames.

Determinism: everything derives from ``seed``. Video ``i`` uses ``default_rng([seed, i])`` for its
content and ``default_rng([seed, i, 1])`` for its defects, so a video does not depend on the
others and changing defect rates does not change the images.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from pmvis.core.errors import PmvisError
from pmvis.core.io import read_json, write_json_atomic
from pmvis.core.masks import encode_mask
from pmvis.platform.data.synthetic_scenes import CATEGORIES, SynthConfig, SynthVideo, render_video

DEFECT_KINDS: tuple[str, ...] = ("inaccurate", "missing")
FRAMES_DIRNAME = "JPEGImages"
_MAX_DEFECT_ATTEMPTS = 20


# --- annotation encoding and defects ---------------------------------------------------------------

def _box(rle: dict[str, Any]) -> list[float]:
    return [float(x) for x in mask_utils.toBbox(rle)]


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _corrupt(mask: np.ndarray, rng: np.random.Generator, max_iou: float) -> tuple[np.ndarray, str] | None:
    """An inaccurate version of ``mask`` (non-empty, IoU <= max_iou), or None if none was found.

    Magnitudes scale with the object's size so a defect is a real error at any resolution.
    """
    area = int(mask.sum())
    reach = max(2, round(0.2 * math.sqrt(area)))
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        kind = int(rng.integers(4))
        if kind < 2:
            k = int(rng.integers(1, reach + 1))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
            op, word = (cv2.erode, "eroded") if kind == 0 else (cv2.dilate, "dilated")
            out, detail = op(mask.astype(np.uint8), kernel).astype(bool), f"{word} {k}px"
        elif kind == 2:
            dx, dy = (int(d) for d in rng.integers(-reach, reach + 1, 2))
            out, detail = _shift(mask, dx, dy), f"shifted ({dx}, {dy})"
        else:
            py, px = np.nonzero(mask)
            j = int(rng.integers(len(px)))
            theta = float(rng.uniform(0, 360))
            yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
            a = math.radians(theta)
            keep = (xx - px[j]) * math.cos(a) + (yy - py[j]) * math.sin(a) >= 0
            out, detail = mask & keep, f"cut by half-plane through ({px[j]}, {py[j]}) at {theta:.0f} deg"
        inter, union = int((out & mask).sum()), int((out | mask).sum())
        if out.any() and inter <= max_iou * union:
            return out, detail
    return None


def _annotation_pair(
    video: SynthVideo, i: int, ann_id: int, video_id: int, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[dict, dict, list[dict]]:
    """The truth annotation, the defective annotation and its defect records for object ``i``."""
    n_t = video.present.shape[1]
    truth = {"id": ann_id, "video_id": video_id, "category_id": video.categories[i], "iscrowd": 0,
             "segmentations": [None] * n_t, "bboxes": [None] * n_t, "areas": [None] * n_t}
    user = {**truth, "segmentations": [None] * n_t, "bboxes": [None] * n_t, "areas": [None] * n_t}
    defects: list[dict] = []
    remaining = int(video.present[i].sum())  # non-null frames left in the user file
    for t in range(n_t):
        if not video.present[i, t]:
            continue
        mask = video.visible[i, t]
        rle = encode_mask(mask)
        box, area = _box(rle), int(mask.sum())
        truth["segmentations"][t], truth["bboxes"][t], truth["areas"][t] = rle, box, area
        user["segmentations"][t], user["bboxes"][t], user["areas"][t] = rle, box, area
        r = rng.random()
        record = {"video_id": video_id, "annotation_id": ann_id, "frame": t}
        if r < cfg.missing_rate and remaining > 1:
            remaining -= 1
            user["segmentations"][t] = user["bboxes"][t] = user["areas"][t] = None
            defects.append({**record, "kind": "missing", "detail": "segmentation, box and area removed"})
        elif r < cfg.missing_rate + cfg.inaccurate_rate:
            bad = _corrupt(mask, rng, cfg.inaccurate_max_iou)
            if bad is not None:
                user["segmentations"][t], user["areas"][t] = encode_mask(bad[0]), int(bad[0].sum())
                defects.append({**record, "kind": "inaccurate", "detail": bad[1]})
    return truth, user, defects


# --- the dataset -----------------------------------------------------------------------------------

def _is_nonempty_dir(path: Path) -> bool:
    if path.exists() and not path.is_dir():
        raise PmvisError(f"{path}: exists and is not a directory")
    return path.is_dir() and any(path.iterdir())


def generate_synthetic(
    out_dir: str | os.PathLike, config: SynthConfig, *, overwrite: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Write the dataset ``config`` describes to ``out_dir`` (whole or not at all); return a summary.

    It is built in a temporary sibling directory renamed onto ``out_dir`` at the end. A non-empty
    ``out_dir`` is an error unless ``overwrite``; then the old one is removed only after the new
    one is complete.
    """
    cfg = config
    out_dir = Path(out_dir).absolute()
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise PmvisError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(CATEGORIES)]
        videos, truth_anns, user_anns, defects = [], [], [], []
        counts = {"null_masks": 0, "occluded_masks": 0}
        for vi in tqdm(range(cfg.videos), desc="synth", unit="video", disable=not progress):
            video = render_video(cfg, vi)
            vid, folder = vi + 1, f"video_{vi + 1:04d}"
            (tmp / FRAMES_DIRNAME / folder).mkdir(parents=True)
            file_names = [f"{folder}/{t:05d}.jpg" for t in range(cfg.frames)]
            for name, frame in zip(file_names, video.frames):
                ok = cv2.imwrite(str(tmp / FRAMES_DIRNAME / name), np.ascontiguousarray(frame[..., ::-1]),
                                 [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
                if not ok:
                    raise OSError(f"cv2 could not write {tmp / FRAMES_DIRNAME / name}")
            videos.append({"id": vid, "width": cfg.width, "height": cfg.height, "length": cfg.frames,
                           "file_names": file_names})
            drng = np.random.default_rng([cfg.seed, vi, 1])
            for i in range(len(video.categories)):
                truth, user, defs = _annotation_pair(video, i, len(truth_anns) + 1, vid, cfg, drng)
                truth_anns.append(truth)
                user_anns.append(user)
                defects.extend(defs)
            counts["null_masks"] += int((~video.present).sum())
            occluded = video.visible.sum(axis=(2, 3)) < video.shapes.sum(axis=(2, 3))
            counts["occluded_masks"] += int((occluded & video.present).sum())
        info = {"description": "pmvis synthetic YouTube-VIS dataset", "generator": __name__,
                "config": cfg.model_dump(mode="json")}
        for name, anns, kind in (("truth.json", truth_anns, "ground truth"),
                                 ("annotations.json", user_anns, "annotations with injected defects")):
            write_json_atomic(tmp / name, {"info": {**info, "contents": kind}, "videos": videos,
                                           "annotations": anns, "categories": categories})
        write_json_atomic(tmp / "defects.json", defects)
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    per_cat = {name: sum(a["category_id"] == k + 1 for a in truth_anns) for k, name in enumerate(CATEGORIES)}
    return {
        "out_dir": str(out_dir),
        "videos": len(videos),
        "frames": len(videos) * cfg.frames,
        "instances": len(truth_anns),
        "masks": sum(s is not None for a in truth_anns for s in a["segmentations"]),
        **counts,
        "instances_per_category": per_cat,
        "defects": {kind: sum(d["kind"] == kind for d in defects) for kind in DEFECT_KINDS},
    }


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``out_dir``; an old dataset is deleted only once replaced."""
    if not _is_nonempty_dir(out_dir):
        os.replace(tmp, out_dir)  # atomic; replaces an empty directory
        return
    if not overwrite:
        raise PmvisError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, trash / "old")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(trash / "old", out_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# --- still images (COCO format), for pretraining ----------------------------------------------------

COCO_STILLS_FILENAME = "coco.json"


def write_coco_stills(data_dir: str | os.PathLike, *, boxes_only: bool = True,
                      name: str = COCO_STILLS_FILENAME) -> Path:
    """Every frame of a synthetic dataset as a COCO still (``DATA/coco.json``, images under
    ``JPEGImages/``): the true boxes, and the true masks unless ``boxes_only`` — the input of
    ``pmvis pretrain``, in the format COCO train2017 has."""
    data_dir = Path(data_dir)
    truth = read_json(data_dir / "truth.json")
    images, annotations = [], []
    image_id: dict[tuple[int, int], int] = {}
    for v in truth["videos"]:
        for t, file_name in enumerate(v["file_names"]):
            image_id[v["id"], t] = len(images) + 1
            images.append({"id": len(images) + 1, "file_name": file_name, "width": v["width"],
                           "height": v["height"], "video_id": v["id"], "frame": t})
    for a in truth["annotations"]:
        for t, box in enumerate(a["bboxes"]):
            if box is None:
                continue
            ann = {"id": len(annotations) + 1, "image_id": image_id[a["video_id"], t], "category_id": a["category_id"],
                   "bbox": box, "area": a["areas"][t], "iscrowd": 0}
            if not boxes_only and a["segmentations"][t] is not None:
                ann["segmentation"] = a["segmentations"][t]
            annotations.append(ann)
    path = data_dir / name
    write_json_atomic(path, {"info": {"description": "pmvis synthetic stills (COCO format)",
                                      "contents": "true boxes" if boxes_only else "true boxes and masks"},
                             "images": images, "annotations": annotations, "categories": truth["categories"]})
    return path
