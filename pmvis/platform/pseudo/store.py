"""The raw pseudo-mask store: a Parquet dataset under ``OUT/raw/``, one file per (source, video).

Schema (one row per video, annotation and source)::

    video_id int64, annotation_id int64, source string, height int32, width int32,
    masks list<string>        per-frame compressed-RLE counts, null where the source has no mask
    confidences list<double>  per-frame confidence, null where there is no mask

One file per (source, video), written atomically under a deterministic name, makes resume and
exactly-once trivial: a (source, video) is done iff its file exists, and a retried task that
writes it again replaces the same file. Fusion, filters, reports and sweeps read only this store,
so the expensive models never run twice.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pmvis.core.errors import PmvisError
from pmvis.core.io import atomic_path
from pmvis.core.masks import Rle, compressed_rle_totals
from pmvis.platform.data.ytvis import MAX_IMAGE_SIDE_PX
from pmvis.platform.data.ytvis_io import Problems

RAW_DIRNAME = "raw"
SCHEMA = pa.schema([
    ("video_id", pa.int64()),
    ("annotation_id", pa.int64()),
    ("source", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("masks", pa.list_(pa.string())),
    ("confidences", pa.list_(pa.float64())),
])


@dataclass
class RawMasks:
    """One source's masks for one annotation."""

    video_id: int
    annotation_id: int
    source: str
    segmentations: list[Rle | None]
    confidences: list[float | None]


def source_dir(raw_dir: str | os.PathLike, source: str) -> Path:
    """The folder of one source's files."""
    return Path(raw_dir) / f"source={source}"


def raw_file(raw_dir: str | os.PathLike, source: str, video_id: int) -> Path:
    return source_dir(raw_dir, source) / f"video_{video_id:08d}.parquet"


def clear_source(raw_dir: str | os.PathLike, source: str) -> None:
    """Delete every stored video of ``source`` (its masks are stale). Interrupted half-way, what
    is left is a subset of the old files, which the old manifest record still describes."""
    folder = source_dir(raw_dir, source)
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise PmvisError(f"{folder}: cannot delete the stale pseudo masks: {e}") from None


def done_videos(raw_dir: str | os.PathLike, source: str) -> set[int]:
    """Videos whose masks from ``source`` are already stored (the resume check): the same files
    read_raw reads, so a stray name or a folder named like a video file is never taken as done."""
    return {vid for src, vid in stored_video_files(raw_dir).values() if src == source}


def rows_from_raw_masks(tracks: Iterable[RawMasks], height: int, width: int) -> dict[str, list]:
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for t in tracks:
        cols["video_id"].append(t.video_id)
        cols["annotation_id"].append(t.annotation_id)
        cols["source"].append(t.source)
        cols["height"].append(height)
        cols["width"].append(width)
        cols["masks"].append([None if s is None else s["counts"] for s in t.segmentations])
        cols["confidences"].append(list(t.confidences))
    return cols


def write_video_rows(raw_dir: str | os.PathLike, source: str, video_id: int, rows: dict[str, list]) -> Path:
    """Write one (source, video)'s rows atomically; an existing file is replaced whole."""
    path = raw_file(raw_dir, source, video_id)
    table = pa.Table.from_pydict(rows, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def resolve_raw_dir(out_dir: str | os.PathLike) -> Path:
    """``OUT/raw`` of a `pmvis pseudo-masks` output dir (``OUT`` itself if it is the store)."""
    out_dir = Path(out_dir)
    if (out_dir / RAW_DIRNAME).is_dir():
        return out_dir / RAW_DIRNAME
    if out_dir.is_dir() and any(out_dir.glob("source=*")):
        return out_dir
    raise PmvisError(f"{out_dir}: no raw pseudo-mask store ({out_dir / RAW_DIRNAME} not found; "
                     f"run `pmvis pseudo-masks` first)")


# A stored file's name inside its hive partition ``source=<name>/``, as raw_file() writes it.
_VIDEO_FILE = re.compile(r"video_(\d+)\.parquet")
PARTITIONING = ds.partitioning(pa.schema([("source", pa.string())]), flavor="hive")


def stored_video_files(raw_dir: str | os.PathLike) -> dict[Path, tuple[str, int]]:
    """The store's files (path -> (source, video id)), sorted by path, discovered as a hive-partitioned
    Parquet dataset (the source from the ``source=`` folder). Only files named as raw_file() names
    them, directly in a source folder, count: anything else (notes, our own ``.tmp`` files, which
    pyarrow skips by their leading dot, other tools' files) is not part of the store."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return {}
    out: dict[Path, tuple[str, int]] = {}
    for fragment in ds.dataset(raw_dir, format="parquet", partitioning=PARTITIONING, schema=SCHEMA).get_fragments():
        path = Path(fragment.path)
        source = ds.get_partition_keys(fragment.partition_expression).get("source")
        m = _VIDEO_FILE.fullmatch(path.name)
        if m and source is not None and path.parent == source_dir(raw_dir, source):
            out[path] = (source, int(m.group(1)))
    return dict(sorted(out.items()))


def stored_sources(raw_dir: str | os.PathLike) -> list[str]:
    """The sources that have at least one stored video."""
    return sorted({source for source, _ in stored_video_files(raw_dir).values()})


def _check_rows(path: Path, d: dict[str, list], source: str, video_id: int) -> None:
    """Validate one file's rows before any mask is used: a corrupt or truncated RLE makes
    pycocotools' merge loop forever and its decode write out of bounds, so every mask's runs must
    cover exactly height * width pixels; sizes must be sane, confidences not infinite, and the
    rows those of the file's (source, video)."""
    problems = Problems(f"{path}: corrupt raw pseudo-mask file")
    counts: list[str] = []
    owners: list[tuple[int, int]] = []  # (row, frame) of each entry of ``counts``
    for i in range(len(d["video_id"])):
        where = f"video id={d['video_id'][i]}, annotation id={d['annotation_id'][i]}"
        if d["annotation_id"][i] is None or (d["video_id"][i], d["source"][i]) != (video_id, source):
            problems.add(f"row {i} ({where}, source {d['source'][i]!r}): expected an annotation of "
                         f"video id={video_id} from source {source!r}, as the file name says")
            continue
        h, w = d["height"][i], d["width"][i]
        masks, confs = d["masks"][i], d["confidences"][i]
        if h is None or w is None or not (0 < h <= MAX_IMAGE_SIDE_PX and 0 < w <= MAX_IMAGE_SIDE_PX):
            problems.add(f"{where}: frame size {w}x{h} is not between 1 and {MAX_IMAGE_SIDE_PX} px")
            continue
        if masks is None or confs is None or len(masks) != len(confs):
            problems.add(f"{where}: 'masks' and 'confidences' must be lists of one length")
            continue
        for t, (m, c) in enumerate(zip(masks, confs)):
            if c is not None and math.isinf(c):  # NaN is allowed: fusion counts it as 0
                problems.add(f"{where}, frame {t}: confidence {c} is infinite")
            if m is not None:
                counts.append(m)
                owners.append((i, t))
    totals = compressed_rle_totals(counts)
    for (i, t), total in zip(owners, totals):
        expected = d["height"][i] * d["width"][i]
        if total != expected:
            what = "malformed (bad character, truncated or negative run)" if total < 0 else f"covers {total} pixels"
            problems.add(f"video id={d['video_id'][i]}, annotation id={d['annotation_id'][i]}, frame {t}: "
                         f"mask RLE {what}, expected {expected} ({d['height'][i]}x{d['width'][i]})")
    problems.raise_if_any()


def read_raw(raw_dir: str | os.PathLike, *, sources: Iterable[str] | None = None) -> list[RawMasks]:
    """Every stored track (optionally only some sources); an empty or missing store, a requested
    source absent from it, or a corrupt file (PmvisError naming file, video, annotation, frame)
    is an error. Files not named as the store names them are ignored (see stored_video_files)."""
    raw_dir = Path(raw_dir)
    files = stored_video_files(raw_dir)
    if sources is not None:
        sources = list(dict.fromkeys(sources))
        available = sorted({source for source, _ in files.values()})
        absent = [s for s in sources if s not in available]
        if absent:
            raise PmvisError(f"{raw_dir}: source(s) {absent} not in the raw pseudo-mask store "
                             f"(it has {available or 'no sources'})")
        files = {f: key for f, key in files.items() if key[0] in sources}
    if not files:
        raise PmvisError(f"{raw_dir}: no raw pseudo masks found (run `pmvis pseudo-masks` first)")
    tracks: list[RawMasks] = []
    for f, (source, video_id) in files.items():
        tracks += _read_file(f, source, video_id)
    return tracks


def read_video_raw(raw_dir: str | os.PathLike, source: str, video_id: int) -> list[RawMasks]:
    """One source's stored masks of one video (checked as :func:`read_raw` checks them); none
    stored: an empty list."""
    path = raw_file(raw_dir, source, video_id)
    return _read_file(path, source, video_id) if path.is_file() else []


def _read_file(f: Path, source: str, video_id: int) -> list[RawMasks]:
    try:
        table = pq.read_table(f, schema=SCHEMA)
    except (pa.ArrowException, OSError) as e:
        raise PmvisError(f"{f}: unreadable raw pseudo-mask file: {e}") from None
    d = table.to_pydict()
    _check_rows(f, d, source, video_id)
    out = []
    for i in range(table.num_rows):
        size = [d["height"][i], d["width"][i]]
        out.append(RawMasks(
            video_id=d["video_id"][i],
            annotation_id=d["annotation_id"][i],
            source=d["source"][i],
            segmentations=[None if c is None else {"size": size, "counts": c} for c in d["masks"][i]],
            confidences=list(d["confidences"][i]),
        ))
    return out


def raw_masks_by_annotation(tracks: Iterable[RawMasks]) -> dict[int, dict[str, RawMasks]]:
    """annotation id -> source -> track."""
    out: dict[int, dict[str, RawMasks]] = {}
    for t in tracks:
        out.setdefault(t.annotation_id, {})[t.source] = t
    return out
