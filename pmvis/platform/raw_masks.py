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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pmvis.platform.errors import PmvisError
from pmvis.platform.io import atomic_path
from pmvis.platform.ytvis import Rle

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
class RawTrack:
    """One source's masks for one annotation."""

    video_id: int
    annotation_id: int
    source: str
    segmentations: list[Rle | None]
    confidences: list[float | None]


def raw_file(raw_dir: str | os.PathLike, source: str, video_id: int) -> Path:
    return Path(raw_dir) / f"source={source}" / f"video_{video_id:08d}.parquet"


def done_videos(raw_dir: str | os.PathLike, source: str) -> set[int]:
    """Videos whose masks from ``source`` are already stored (the resume check)."""
    folder = Path(raw_dir) / f"source={source}"
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("_")[1]) for p in folder.glob("video_*.parquet")}


def rows_from_tracks(tracks: Iterable[RawTrack], height: int, width: int) -> dict[str, list]:
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


def stored_sources(raw_dir: str | os.PathLike) -> list[str]:
    """The sources that have at least one stored video."""
    return sorted(p.name.split("=", 1)[1] for p in Path(raw_dir).glob("source=*")
                  if p.is_dir() and any(p.glob("video_*.parquet")))


def read_raw(raw_dir: str | os.PathLike, *, sources: Iterable[str] | None = None) -> list[RawTrack]:
    """Every stored track (optionally only some sources); an empty or missing store, or a requested
    source absent from it, is an error."""
    raw_dir = Path(raw_dir)
    files = sorted(raw_dir.glob("source=*/video_*.parquet"))
    if sources is not None:
        sources = list(dict.fromkeys(sources))
        available = stored_sources(raw_dir)
        absent = [s for s in sources if s not in available]
        if absent:
            raise PmvisError(f"{raw_dir}: source(s) {absent} not in the raw pseudo-mask store "
                             f"(it has {available or 'no sources'})")
        wanted = {f"source={s}" for s in sources}
        files = [f for f in files if f.parent.name in wanted]
    if not files:
        raise PmvisError(f"{raw_dir}: no raw pseudo masks found (run `pmvis pseudo-masks` first)")
    tracks: list[RawTrack] = []
    for f in files:
        try:
            table = pq.read_table(f, schema=SCHEMA)
        except (pa.ArrowInvalid, OSError) as e:
            raise PmvisError(f"{f}: unreadable raw pseudo-mask file: {e}") from None
        d = table.to_pydict()
        for i in range(table.num_rows):
            size = [d["height"][i], d["width"][i]]
            tracks.append(RawTrack(
                video_id=d["video_id"][i],
                annotation_id=d["annotation_id"][i],
                source=d["source"][i],
                segmentations=[None if c is None else {"size": size, "counts": c} for c in d["masks"][i]],
                confidences=list(d["confidences"][i]),
            ))
    return tracks


def tracks_by_annotation(tracks: Iterable[RawTrack]) -> dict[int, dict[str, RawTrack]]:
    """annotation id -> source -> track."""
    out: dict[int, dict[str, RawTrack]] = {}
    for t in tracks:
        out.setdefault(t.annotation_id, {})[t.source] = t
    return out
