"""COCO-format image sets as training data: each image becomes a one-frame "video".

Pretraining (IDOL's COCO pseudo-video recipe, `pmvis pretrain`) reads a COCO instances file
(``images``, ``annotations`` with ``bbox`` and optional ``segmentation``, ``categories``): COCO
train2017 for real runs, synthetic stills (:func:`pmvis.platform.data.synthetic.generate_stills`) here.
The file is validated here with errors that name COCO's own ids (image id, annotation id) and
then converted into a :class:`YTVISDataset` of one-frame videos (video id = image id), so the
training code, the box and mask validation and the frame reader are the YTVIS ones;
:class:`pmvis.platform.data.pseudo_video.PseudoVideoSampler` turns each still into a clip.

Choices (ours): images without a usable annotation are skipped (they cannot give a key frame);
crowd annotations are kept and flagged (the sampler ignores them, as IDOL does); a box may stick
out of the image by at most ``BOX_TOLERANCE_PX`` (then it is clipped), further is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pmvis.core.errors import PmvisError
from pmvis.core.io import read_json
from pmvis.platform.data.ytvis import YTVISDataset
from pmvis.platform.data.ytvis_io import (
    BOX_TOLERANCE_PX,
    Problems,
    check_file_name,
    check_image_size,
    checked_id,
    is_finite_number,
    is_int,
    parse_ytvis,
)


def coco_to_ytvis(raw: Any, *, source: str = "<memory>") -> dict[str, Any]:
    """Validate a COCO instances dict and return the equivalent YTVIS dict of one-frame videos.

    Every problem found is reported at once (PmvisError naming ``source`` and the COCO ids)."""
    problems = Problems(source)
    if not isinstance(raw, dict):
        raise PmvisError(f"{source}: a COCO file is a JSON object, got {type(raw).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            problems.add(f"top-level key '{key}' must be a list" if key in raw else f"missing top-level key '{key}'")
    problems.raise_if_any()
    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(raw["images"]):
        checked = checked_id(im, i, "images", "image", images, problems)
        if checked is None:
            continue
        iid, where = checked
        w, h = im.get("width"), im.get("height")
        if not check_image_size(w, h, where, problems):
            continue
        try:
            name = check_file_name(im.get("file_name"))
        except ValueError as e:
            problems.add(f"{where}: {e}")
            continue
        images[iid] = {"id": iid, "width": w, "height": h, "length": 1, "file_names": [name]}
    categories = []
    seen_cats: set[int] = set()
    for i, c in enumerate(raw["categories"]):
        cid = c.get("id") if isinstance(c, dict) else None
        if not is_int(cid) or not isinstance(c.get("name"), str):
            problems.add(f"categories[{i}]: needs an integer 'id' and a string 'name', got {c!r}")
        elif cid in seen_cats:
            problems.add(f"category id={cid}: duplicate category id")
        else:
            seen_cats.add(cid)
            categories.append({"id": cid, "name": c["name"]})
    annotations = []
    seen_anns: set[int] = set()
    for i, a in enumerate(raw["annotations"]):
        iid = a.get("image_id") if isinstance(a, dict) else None
        checked = checked_id(a, i, "annotations", "annotation", seen_anns, problems,
                             where=lambda aid: f"annotation id={aid} (image id={iid})")
        if checked is None:
            continue
        aid, where = checked
        seen_anns.add(aid)
        image = images.get(iid) if is_int(iid) else None
        if image is None:
            problems.add(f"{where}: 'image_id' {iid!r} is not an image of this file")
            continue
        cid = a.get("category_id")
        if not is_int(cid) or cid not in seen_cats:
            problems.add(f"{where}: 'category_id' {cid!r} is not a category of this file")
            continue
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(is_finite_number(b) for b in box)):
            problems.add(f"{where}: 'bbox' must be [x, y, w, h] of 4 finite numbers, got {box!r}")
            continue
        x, y, bw, bh = (float(b) for b in box)
        W, H, tol = image["width"], image["height"], BOX_TOLERANCE_PX
        if bw < 0 or bh < 0:
            problems.add(f"{where}: bbox {box} has a negative width or height")
            continue
        if x < -tol or y < -tol or x + bw > W + tol or y + bh > H + tol:
            problems.add(f"{where}: bbox {box} lies outside the {W}x{H} image {image['file_names'][0]}")
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(W)), min(y + bh, float(H))
        if x1 <= x0 or y1 <= y0:
            continue  # a degenerate box cannot supervise anything
        iscrowd = a.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            problems.add(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
            continue
        area = a.get("area")
        annotations.append({
            "id": aid, "video_id": iid, "category_id": cid, "iscrowd": iscrowd,
            "bboxes": [[x0, y0, x1 - x0, y1 - y0]], "segmentations": [a.get("segmentation")],
            "areas": [float(area) if is_finite_number(area) and area >= 0 else (x1 - x0) * (y1 - y0)],
        })
    problems.raise_if_any()
    used = {a["video_id"] for a in annotations}
    videos = [images[i] for i in sorted(used)]
    if not videos:
        raise PmvisError(f"{source}: no image has a usable annotation")
    return {"info": raw.get("info") if isinstance(raw.get("info"), dict) else {}, "videos": videos,
            "annotations": annotations, "categories": categories}


def load_coco_stills(path: str | os.PathLike, images_root: str | os.PathLike) -> YTVISDataset:
    """A COCO instances file as a :class:`YTVISDataset` of one-frame videos (frames read from
    ``images_root``); malformed input is a PmvisError naming the file and the COCO ids."""
    path = Path(path)
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise PmvisError(f"{images_root}: image directory not found (COCO file {path})")
    raw = read_json(path)
    dataset = parse_ytvis(coco_to_ytvis(raw, source=str(path)), source=f"{path} (as one-frame videos)")
    dataset.path = path
    dataset.frames_root = images_root
    return dataset
