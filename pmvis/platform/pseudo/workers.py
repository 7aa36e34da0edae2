"""What runs inside Ray Data's workers: a pseudo-mask source over one video, then RLE encoding.

A source is built once per worker (an actor for model sources, a cached runner per CPU worker
process for the others) and applied to one video per batch. Its errors come back as rows, never
as exceptions, so one bad video neither kills the worker nor gets retried.

Rows hold plain columns, no pickled objects. The source stage emits per video a tensor column
``masks`` (uint8, ``(N, T, H, W)``: N annotations, T frames; zeros where a frame has no mask),
``present`` (bool ``(N, T)``), ``confidences`` (float64 ``(N, T)``) with ``has_confidence`` (bool
``(N, T)``: the source gave one), ``annotation_ids`` (int64 ``(N,)``). The encode stage turns them
into the store's columns: per annotation the frames' RLE counts (``list<string>``, null where no
mask) and confidences (``list<double>``). A source seeded by another's masks (``track`` from
``hqsam``) reads them from the store itself, one file per video.
"""

from __future__ import annotations

import functools
import importlib
import json
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask, encode_mask
from pmvis.models.sources.base import SourceMasks, VideoInput, build_source
from pmvis.platform.data.ytvis import ANNOTATIONS_FILENAME, YTVISDataset
from pmvis.platform.data.ytvis_io import load_dataset_dir
from pmvis.platform.pseudo.store import read_video_raw


def import_plugins(plugins: list[str]) -> None:
    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PmvisError(f"cannot import source plugin {name!r}: {e}") from None


@functools.lru_cache(maxsize=4)
def _cached_dataset(data_dir: str, annotations: str | None, mtime_ns: int) -> YTVISDataset:
    return load_dataset_dir(data_dir, annotations)


def _dataset(data_dir: str, annotations: str | None) -> YTVISDataset:
    """The dataset, parsed once per worker process (re-read if the file changed)."""
    path = Path(data_dir) / (annotations or ANNOTATIONS_FILENAME)
    return _cached_dataset(data_dir, annotations, path.stat().st_mtime_ns)


def _init_masks(raw_dir: str | None, init_from: str | None, video_id: int) -> dict[int, SourceMasks]:
    """The seeding source's stored masks of this video (none stored: no seeds, every instance then
    starts from its box)."""
    if not init_from or raw_dir is None:
        return {}
    return {r.annotation_id: SourceMasks(masks=[None if s is None else decode_mask(s) for s in r.segmentations],
                                         confidences=list(r.confidences))
            for r in read_video_raw(raw_dir, init_from, video_id)}


def _video_input(data_dir: str, annotations: str | None, video_id: int, init: dict[int, SourceMasks]) -> VideoInput:
    ds = _dataset(data_dir, annotations)
    anns = ds.annotations_by_video()[video_id]
    return VideoInput(
        video_id=video_id,
        frames=ds.read_video(video_id),
        boxes={a.id: a.bboxes for a in anns},
        categories={a.id: a.category_id for a in anns},
        init_masks=init,
    )


def _check_output(video: VideoInput, out: dict) -> None:
    """A source must return a mask list of the video's length, each (H, W) bool or None."""
    T, (H, W) = video.length, video.size
    for ann_id, sm in out.items():
        if len(sm.masks) != T or len(sm.confidences) != T:
            raise RuntimeError(f"annotation id={ann_id}: source returned {len(sm.masks)} frames, expected {T}")
        for t, m in enumerate(sm.masks):
            if m is not None and m.shape != (H, W):
                raise RuntimeError(f"annotation id={ann_id}, frame {t}: mask shape {m.shape} != {(H, W)}")


def _mask_columns(result: dict[int, SourceMasks], length: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """A source's output for one video as the source stage's tensor columns (see the module doc)."""
    ids = sorted(result)
    masks = np.zeros((len(ids), length, *size), dtype=np.uint8)
    present = np.zeros((len(ids), length), dtype=bool)
    confidences = np.zeros((len(ids), length), dtype=np.float64)
    has_confidence = np.zeros((len(ids), length), dtype=bool)
    for n, aid in enumerate(ids):
        for t, (m, c) in enumerate(zip(result[aid].masks, result[aid].confidences)):
            if m is not None:
                masks[n, t], present[n, t] = m, True
            if c is not None:
                confidences[n, t], has_confidence[n, t] = float(c), True
    return {"annotation_ids": np.asarray(ids, dtype=np.int64), "masks": masks, "present": present,
            "confidences": confidences, "has_confidence": has_confidence}


def _empty_columns() -> dict[str, np.ndarray]:
    """The columns of a video that failed: no annotations."""
    return _mask_columns({}, 0, (0, 0))


def _batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows → a batch: every column stacked on a leading axis of one entry per row (batch_size=1)."""
    return {k: [r[k] for r in rows] if k in ("source", "error", "setup_error") else np.stack([r[k] for r in rows])
            for k in rows[0]}


class SourceRunner:
    """Builds a source once per worker and applies it to batches of videos (batch_size=1)."""

    def __init__(self, name: str, options: dict, plugins: list[str], data_dir: str, annotations: str | None,
                 raw_dir: str | None = None, init_from: str | None = None):
        self.name = name
        self.data_dir = data_dir
        self.annotations = annotations
        self.raw_dir, self.init_from = raw_dir, init_from
        # A source that cannot be built (weights that do not fit the model...) fails the same way
        # on every try: it becomes the run's error instead of an actor that dies and is retried.
        self.setup_error = ""
        try:
            import_plugins(plugins)
            self.source = build_source(name, options)
        except PmvisError as e:
            self.setup_error = str(e)
        except Exception as e:
            self.setup_error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"

    def run_video(self, video_id: int) -> dict[str, Any]:
        row: dict[str, Any] = {"video_id": np.int64(video_id), "source": self.name, "error": self.setup_error,
                               "setup_error": self.setup_error, "height": np.int32(0), "width": np.int32(0)}
        if self.setup_error:
            return {**row, **_empty_columns()}
        try:
            video = _video_input(self.data_dir, self.annotations, video_id,
                                 _init_masks(self.raw_dir, self.init_from, video_id))
            result = self.source(video)
            _check_output(video, result)
            height, width = video.size
            return {**row, "height": np.int32(height), "width": np.int32(width),
                    **_mask_columns(result, video.length, video.size)}
        except PmvisError as e:
            error = str(e)
        except Exception as e:  # a bug or a model failure: keep the others going, report it
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        return {**row, "error": error, **_empty_columns()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return _batch([self.run_video(int(v)) for v in batch["video_id"]])


def encode_batch(batch: dict[str, Any]) -> dict[str, list]:
    """CPU stage: the masks → compressed RLE counts per annotation and frame, the store's columns."""
    out: dict[str, list] = {k: [] for k in ("video_id", "source", "height", "width", "annotation_ids", "masks",
                                            "confidences", "error", "setup_error")}
    for i in range(len(batch["video_id"])):
        masks, present = batch["masks"][i], batch["present"][i]
        confidences, has_confidence = batch["confidences"][i], batch["has_confidence"][i]
        counts = [[encode_mask(masks[n, t])["counts"] if present[n, t] else None for t in range(masks.shape[1])]
                  for n in range(masks.shape[0])]
        confs = [[float(confidences[n, t]) if has_confidence[n, t] else None for t in range(masks.shape[1])]
                 for n in range(masks.shape[0])]
        out["video_id"].append(int(batch["video_id"][i]))
        out["source"].append(str(batch["source"][i]))
        out["height"].append(int(batch["height"][i]))
        out["width"].append(int(batch["width"][i]))
        out["annotation_ids"].append([int(a) for a in batch["annotation_ids"][i]])
        out["masks"].append(counts)
        out["confidences"].append(confs)
        out["error"].append(str(batch["error"][i]))
        out["setup_error"].append(str(batch["setup_error"][i]))
    return out


def store_rows(row: dict[str, Any]) -> dict[str, list]:
    """One encoded video's row → the store's columns (one row per annotation)."""
    ids = [int(a) for a in row["annotation_ids"]]
    n = len(ids)
    return {"video_id": [int(row["video_id"])] * n, "annotation_id": ids, "source": [str(row["source"])] * n,
            "height": [int(row["height"])] * n, "width": [int(row["width"])] * n,
            "masks": [[None if c is None else str(c) for c in m] for m in row["masks"]],
            "confidences": [[None if c is None else float(c) for c in cs] for cs in row["confidences"]]}


def run_cpu_source(batch: dict[str, np.ndarray], *, name: str, options: dict, plugins: list[str],
                   data_dir: str, annotations: str | None, raw_dir: str | None = None,
                   init_from: str | None = None) -> dict[str, Any]:
    """CPU-task sources: built once per worker process (cached), then run like an actor."""
    key = json.dumps(options, sort_keys=True)
    return _cpu_runner(name, key, tuple(plugins), data_dir, annotations, raw_dir, init_from)(batch)


@functools.lru_cache(maxsize=8)
def _cpu_runner(name: str, options_json: str, plugins: tuple, data_dir: str, annotations: str | None,
                raw_dir: str | None, init_from: str | None) -> SourceRunner:
    return SourceRunner(name, json.loads(options_json), list(plugins), data_dir, annotations, raw_dir, init_from)
