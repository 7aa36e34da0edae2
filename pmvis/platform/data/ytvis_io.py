"""Read, validate and write YouTube-VIS / OVIS files: annotations, results and dataset folders.

Every segmentation is normalised to a compressed RLE on load, whatever the file used (polygons,
uncompressed RLE, compressed RLE). Every error names the file, the video/annotation id and the
frame; validation collects several problems before raising so a user can fix a file in one pass.
Writes are atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Container

from pycocotools import mask as mask_utils

from pmvis.core.errors import PmvisError
from pmvis.core.io import check_output_file, read_json, write_json_atomic
from pmvis.core.masks import Rle, compressed_rle_total, to_coco_rle
from pmvis.platform.data.ytvis import (
    ANNOTATIONS_FILENAME,
    DATASET_FILENAMES,
    FRAMES_DIRNAME,
    MAX_IMAGE_SIDE_PX,
    Annotation,
    Video,
    YTVISDataset,
    frame_file_problem,
)

# A box may overhang the image by this much (pixels) before it is an error: boxes derived from
# polygons or resized annotations land a fraction of a pixel outside.
BOX_TOLERANCE_PX = 1.0


# A polygon vertex may lie this far (pixels) outside the image; further is an error. pycocotools
# allocates in proportion to the coordinates, so unbounded ones crash or exhaust memory.
POLYGON_TOLERANCE_PX = 1.0


# How many problems one validation error lists before "... and N more".
MAX_REPORTED_ERRORS = 20


def is_finite_number(v: Any) -> bool:
    """A real number (not a bool) that converts to a finite float; a huge int is not."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def normalise_segmentation(seg: Any, height: int, width: int) -> Rle | None:
    """Polygon list, uncompressed RLE or compressed RLE → compressed RLE; raises ValueError."""
    if seg is None:
        return None
    if isinstance(seg, list):
        if not seg:
            raise ValueError("empty polygon list (use null for an absent object)")
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise ValueError("a polygon must be a flat list of at least 3 (x, y) pairs")
            if not all(is_finite_number(v) for v in poly):
                raise ValueError("polygon coordinates must be finite numbers")
            xs, ys = [float(v) for v in poly[0::2]], [float(v) for v in poly[1::2]]
            tol = POLYGON_TOLERANCE_PX
            if min(xs) < -tol or min(ys) < -tol or max(xs) > width + tol or max(ys) > height + tol:
                raise ValueError(
                    f"polygon spans x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}: "
                    f"outside the {width}x{height} image"
                )
            polys.append([float(v) for v in poly])
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    if isinstance(seg, dict):
        size = seg.get("size")
        counts = seg.get("counts")
        if (
            not isinstance(size, list) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        ):
            raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match the video's [height, width] [{height}, {width}]")
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise ValueError("uncompressed RLE counts must be non-negative integers")
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
            return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if isinstance(counts, str):
            try:
                total = compressed_rle_total(counts)
            except ValueError as e:
                raise ValueError(f"malformed compressed RLE counts: {e}") from None
            if total != height * width:
                raise ValueError(f"compressed RLE covers {total} pixels, expected {height * width}")
            return {"size": [height, width], "counts": counts}
        raise ValueError("RLE 'counts' must be a list of ints or a compressed string")
    raise ValueError(f"segmentation must be null, a polygon list or an RLE dict, got {type(seg).__name__}")


class Problems:
    """Collects validation problems so one error reports many of them."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_ERRORS]
        more = len(self.items) - len(shown)
        lines = [f"{self.source}: {len(self.items)} problem(s):"] + [f"  {m}" for m in shown]
        if more:
            lines.append(f"  ... and {more} more")
        raise PmvisError("\n".join(lines))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_file_name(name: Any) -> str:
    """A frame path must be relative and stay inside the dataset's frames root."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name must be a non-empty string, got {name!r}")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"file name {name!r} is absolute; it must be relative to the frames root")
    if ".." in p.parts:
        raise ValueError(f"file name {name!r} contains '..' and could escape the frames root")
    if "\x00" in name:
        raise ValueError(f"file name {name!r} contains a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"file name {name!r} is not valid Unicode (a lone surrogate; undecodable bytes?)") from None
    return name


def checked_id(item: Any, index: int, list_name: str, kind: str, seen: Container[int], problems: Problems,
               where: Callable[[int], str] | None = None) -> tuple[int, str] | None:
    """The integer ``id`` of entry ``index`` of a JSON list and where to say it is (``where(id)``,
    default "KIND id=ID"); a problem noted and None when the entry is not an object, its id is not
    an integer, or the id repeats one in ``seen``."""
    if not isinstance(item, dict):
        problems.add(f"{list_name}[{index}]: must be an object")
        return None
    rid = item.get("id")
    if not is_int(rid):
        problems.add(f"{list_name}[{index}]: 'id' must be an integer, got {rid!r}")
        return None
    at = where(rid) if where is not None else f"{kind} id={rid}"
    if rid in seen:
        problems.add(f"{at}: duplicate {kind} id")
        return None
    return rid, at


def check_image_size(w: Any, h: Any, where: str, problems: Problems, *, what: str = "image") -> bool:
    """Positive integer ``w`` × ``h`` within :data:`MAX_IMAGE_SIDE_PX`; else a problem noted at ``where``."""
    if not (is_int(w) and is_int(h) and w > 0 and h > 0):
        problems.add(f"{where}: 'width' and 'height' must be positive integers, got {w!r}x{h!r}")
        return False
    if max(w, h) > MAX_IMAGE_SIDE_PX:
        problems.add(f"{where}: {what} size {w}x{h} exceeds the largest supported side, {MAX_IMAGE_SIDE_PX} px")
        return False
    return True


def _parse_videos(raw: Any, problems: Problems) -> dict[int, Video]:
    videos: dict[int, Video] = {}
    if not isinstance(raw, list):
        problems.add("'videos' must be a list")
        return videos
    for i, v in enumerate(raw):
        checked = checked_id(v, i, "videos", "video", videos, problems)
        if checked is None:
            continue
        vid, where = checked
        w, h = v.get("width"), v.get("height")
        if not check_image_size(w, h, where, problems, what="frame"):
            continue
        names = v.get("file_names")
        if not isinstance(names, list):
            problems.add(f"{where}: 'file_names' must be a list")
            continue
        if not names:
            problems.add(f"{where}: video has no frames (empty 'file_names')")
            continue
        ok = True
        for t, name in enumerate(names):
            try:
                check_file_name(name)
            except ValueError as e:
                problems.add(f"{where}, frame {t}: {e}")
                ok = False
        length = v.get("length", len(names))
        if length != len(names):
            problems.add(f"{where}: 'length' is {length!r} but there are {len(names)} file_names")
            ok = False
        if ok:
            extra = {k: val for k, val in v.items() if k not in ("id", "width", "height", "length", "file_names")}
            videos[vid] = Video(id=vid, width=w, height=h, file_names=list(names), extra=extra)
    return videos


def _parse_categories(raw: Any, problems: Problems) -> dict[int, str]:
    cats: dict[int, str] = {}
    if not isinstance(raw, list):
        problems.add("'categories' must be a list")
        return cats
    for i, c in enumerate(raw):
        cid = c.get("id") if isinstance(c, dict) else None
        if not is_int(cid):
            problems.add(f"categories[{i}]: 'id' must be an integer")
        elif cid in cats:
            problems.add(f"category id={cid}: duplicate category id")
        else:
            cats[cid] = str(c.get("name", cid))
    return cats


def _check_box(box: Any, video: Video) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"box must be [x, y, w, h], got {box!r}")
    if not all(is_finite_number(b) for b in box):
        raise ValueError(f"box must hold 4 finite numbers, got {box!r}")
    x, y, w, h = (float(b) for b in box)
    if w < 0 or h < 0:
        raise ValueError(f"box {box} has a negative width or height")
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > video.width + tol or y + h > video.height + tol:
        raise ValueError(f"box {box} lies outside the {video.width}x{video.height} image")
    return [x, y, w, h]


def _per_frame(ann: dict, key: str, length: int, where: str, problems: Problems) -> list | None:
    values = ann.get(key)
    if values is None:
        return [None] * length
    if not isinstance(values, list):
        problems.add(f"{where}: '{key}' must be a list")
        return None
    if len(values) != length:
        problems.add(f"{where}: '{key}' has {len(values)} entries but the video has {length} frames")
        return None
    return values


def _parse_annotation(
    a: dict, i: int, videos: dict[int, Video], cats: dict[int, str], problems: Problems
) -> Annotation | None:
    aid = a.get("id")
    vid = a.get("video_id")
    where = f"annotation id={aid} (video id={vid})" if is_int(aid) else f"annotations[{i}]"
    if not is_int(aid):
        problems.add(f"{where}: 'id' must be an integer, got {aid!r}")
        return None
    video = videos.get(vid) if is_int(vid) else None
    if video is None:
        problems.add(f"{where}: 'video_id' {vid!r} is not a video of this file")
        return None
    cid = a.get("category_id")
    if not is_int(cid) or cid not in cats:
        problems.add(f"{where}: 'category_id' {cid!r} is not a category of this file")
        return None
    T = video.length
    segs = _per_frame(a, "segmentations", T, where, problems)
    boxes = _per_frame(a, "bboxes", T, where, problems)
    areas = _per_frame(a, "areas", T, where, problems)
    if segs is None or boxes is None or areas is None:
        return None
    n_problems = len(problems.items)
    out_segs: list[Rle | None] = []
    out_boxes: list[list[float] | None] = []
    out_areas: list[float | None] = []
    for t in range(T):
        at = f"{where}, frame {t}"
        try:
            rle = normalise_segmentation(segs[t], video.height, video.width)
        except ValueError as e:
            problems.add(f"{at}: {e}")
            rle = None
        box = boxes[t]
        if box is not None:
            try:
                box = _check_box(box, video)
            except ValueError as e:
                problems.add(f"{at}: {e}")
        elif rle is not None:
            box = [float(b) for b in mask_utils.toBbox(to_coco_rle(rle))]
        area = areas[t]
        if area is not None:
            if not is_finite_number(area) or area < 0:
                problems.add(f"{at}: area must be a non-negative number, got {area!r}")
        elif rle is not None:
            area = float(mask_utils.area(to_coco_rle(rle)))
        out_segs.append(rle)
        out_boxes.append(box)
        out_areas.append(area)
    if all(b is None for b in out_boxes) and all(s is None for s in out_segs):
        problems.add(f"{where}: instance is absent from every frame (no box and no mask)")
    if len(problems.items) != n_problems:
        return None
    iscrowd = a.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        problems.add(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        return None
    known = ("id", "video_id", "category_id", "iscrowd", "segmentations", "bboxes", "areas")
    extra = {k: v for k, v in a.items() if k not in known}
    return Annotation(id=aid, video_id=vid, category_id=cid, segmentations=out_segs, bboxes=out_boxes,
                      areas=out_areas, iscrowd=int(iscrowd), extra=extra)


def parse_ytvis(raw: Any, *, source: str = "<memory>") -> YTVISDataset:
    """Validate an in-memory YTVIS dict; raise one PmvisError listing every problem found."""
    problems = Problems(source)
    if not isinstance(raw, dict):
        raise PmvisError(f"{source}: a YouTube-VIS file is a JSON object, got {type(raw).__name__}")
    for key in ("videos", "annotations", "categories"):
        if key not in raw:
            problems.add(f"missing top-level key '{key}'")
    problems.raise_if_any()
    videos = _parse_videos(raw["videos"], problems)
    cats = _parse_categories(raw["categories"], problems)
    anns: list[Annotation] = []
    seen: set[int] = set()
    raw_anns = raw["annotations"]
    if not isinstance(raw_anns, list):
        problems.add("'annotations' must be a list")
        raw_anns = []
    for i, a in enumerate(raw_anns):
        if not isinstance(a, dict):
            problems.add(f"annotations[{i}]: must be an object")
            continue
        if is_int(a.get("id")) and a["id"] in seen:
            problems.add(f"annotation id={a['id']}: duplicate annotation id")
            continue
        ann = _parse_annotation(a, i, videos, cats, problems)
        if ann is not None:
            seen.add(ann.id)
            anns.append(ann)
    problems.raise_if_any()
    info = raw.get("info") if isinstance(raw.get("info"), dict) else {}
    return YTVISDataset(videos=videos, annotations=anns, categories=cats, info=info)


def load_ytvis(
    path: str | os.PathLike,
    *,
    frames_root: str | os.PathLike | None = None,
    check_frames: bool = False,
) -> YTVISDataset:
    """Load and validate a YouTube-VIS/OVIS file.

    ``frames_root`` defaults to ``JPEGImages/`` beside the file. ``check_frames`` verifies that
    every listed frame file exists (cheap stat calls; decoding happens when frames are read).
    """
    path = Path(path)
    dataset = parse_ytvis(read_json(path), source=str(path))
    dataset.path = path
    dataset.frames_root = Path(frames_root) if frames_root is not None else path.parent / FRAMES_DIRNAME
    if check_frames:
        problems = Problems(str(path))
        real_root = os.path.realpath(dataset.frames_root)
        for video in dataset.videos.values():
            for t, name in enumerate(video.file_names):
                problem = frame_file_problem(dataset.frames_root / name, real_root)
                if problem:
                    problems.add(f"video id={video.id}, frame {t}: {problem}")
        problems.raise_if_any()
    return dataset


def save_ytvis(dataset: YTVISDataset, path: str | os.PathLike) -> None:
    write_json_atomic(path, dataset.to_json())


def load_dataset_dir(
    data_dir: str | os.PathLike, annotations: str | os.PathLike | None = None, *, check_frames: bool = False
) -> YTVISDataset:
    """A dataset directory as `pmvis synth` writes it (and YTVIS ships): annotations + JPEGImages/.

    ``annotations`` overrides the file (absolute, or relative to ``data_dir``); frames are always
    read from ``data_dir/JPEGImages``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PmvisError(f"{data_dir}: dataset directory not found")
    path = data_dir / (annotations if annotations is not None else ANNOTATIONS_FILENAME)
    return load_ytvis(path, frames_root=data_dir / FRAMES_DIRNAME, check_frames=check_frames)


def check_output_for_dataset(out: str | os.PathLike, dataset: YTVISDataset, *, flag: str = "--out") -> None:
    """Refuse an output path that is a directory, lies under a regular file, or would overwrite the
    dataset's annotation file in use, one of its standard files (annotations, truth, defects) or
    anything in its frames directory."""
    inputs: list[Path] = [dataset.path] if dataset.path is not None else []
    dirs: list[Path] = []
    if dataset.frames_root is not None:
        inputs += [dataset.frames_root.parent / name for name in DATASET_FILENAMES]
        dirs.append(dataset.frames_root)
    check_output_file(out, inputs=inputs, input_dirs=dirs, flag=flag)
