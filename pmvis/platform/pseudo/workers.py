"""What runs inside Ray Data's workers: a pseudo-mask source over one video, then RLE encoding.

A source is built once per worker (an actor for model sources, a cached runner per CPU worker
process for the others) and applied to one video per batch. Its errors come back as rows, never
as exceptions, so one bad video neither kills the worker nor gets retried.
"""

from __future__ import annotations

import functools
import importlib
import json
import pickle
import traceback
from pathlib import Path
import numpy as np
from pmvis.core.errors import PmvisError
from pmvis.platform.pseudo.store import (
    RawMasks,
    rows_from_raw_masks,
)
from pmvis.platform.data.ytvis_io import load_dataset_dir
from pmvis.core.masks import encode_mask
from pmvis.platform.data.ytvis import ANNOTATIONS_FILENAME
from pmvis.models.sources.base import SourceMasks, VideoInput
from pmvis.models.sources.base import build_source


def import_plugins(plugins: list[str]) -> None:
    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PmvisError(f"cannot import source plugin {name!r}: {e}") from None


@functools.lru_cache(maxsize=4)
def _cached_dataset(data_dir: str, annotations: str | None, mtime_ns: int):
    return load_dataset_dir(data_dir, annotations)


def _dataset(data_dir: str, annotations: str | None):
    """The dataset, parsed once per worker process (re-read if the file changed)."""

    path = Path(data_dir) / (annotations or ANNOTATIONS_FILENAME)
    return _cached_dataset(data_dir, annotations, path.stat().st_mtime_ns)


def _video_input(data_dir: str, annotations: str | None, video_id: int, init_blob: bytes | None):
    ds = _dataset(data_dir, annotations)
    anns = ds.annotations_by_video()[video_id]
    init: dict[int, SourceMasks] = {}
    if init_blob:
        from pmvis.core.masks import decode_mask

        for ann_id, (segs, confs) in pickle.loads(init_blob).items():
            init[ann_id] = SourceMasks(masks=[None if s is None else decode_mask(s) for s in segs],
                                      confidences=confs)
    return VideoInput(
        video_id=video_id,
        frames=ds.read_video(video_id),
        boxes={a.id: a.bboxes for a in anns},
        categories={a.id: a.category_id for a in anns},
        init_masks=init,
    )


def _check_output(video, out: dict) -> None:
    """A source must return a mask list of the video's length, each (H, W) bool or None."""
    T, (H, W) = video.length, video.size
    for ann_id, sm in out.items():
        if len(sm.masks) != T or len(sm.confidences) != T:
            raise RuntimeError(f"annotation id={ann_id}: source returned {len(sm.masks)} frames, expected {T}")
        for t, m in enumerate(sm.masks):
            if m is not None and m.shape != (H, W):
                raise RuntimeError(f"annotation id={ann_id}, frame {t}: mask shape {m.shape} != {(H, W)}")


class SourceRunner:
    """Builds a source once per worker and applies it to batches of videos (batch_size=1)."""

    def __init__(self, name: str, options: dict, plugins: list[str], data_dir: str, annotations: str | None):
        self.name = name
        self.data_dir = data_dir
        self.annotations = annotations
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"video_id": [], "source": [], "payload": [], "error": [], "setup_error": []}
        for video_id, init_blob in zip(batch["video_id"], batch["init"]):
            video_id = int(video_id)
            payload, error = b"", self.setup_error
            out["setup_error"].append(self.setup_error)
            if self.setup_error:
                out["video_id"].append(video_id)
                out["source"].append(self.name)
                out["payload"].append(payload)
                out["error"].append(error)
                continue
            try:
                video = _video_input(self.data_dir, self.annotations, video_id, init_blob or None)
                result = self.source(video)
                _check_output(video, result)
                payload = pickle.dumps({
                    "size": video.size,
                    "tracks": {aid: (np.stack([m if m is not None else np.zeros(video.size, bool)
                                               for m in sm.masks]) if sm.masks else None,
                                     [m is not None for m in sm.masks], sm.confidences)
                               for aid, sm in result.items()},
                })
            except PmvisError as e:
                error = str(e)
            except Exception as e:  # a bug or a model failure: keep the others going, report it
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            out["video_id"].append(video_id)
            out["source"].append(self.name)
            out["payload"].append(payload)
            out["error"].append(error)
        return out


def encode_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """CPU stage: binary masks → compressed RLE rows, ready for the store."""
    out: dict[str, list] = {"video_id": [], "source": [], "rows": [], "error": [],
                            "setup_error": [str(e) for e in batch["setup_error"]]}
    for video_id, source, payload, error in zip(batch["video_id"], batch["source"], batch["payload"], batch["error"]):
        rows = b""
        if not error:
            data = pickle.loads(payload)
            H, W = data["size"]
            tracks = []
            for aid, (stack, present, confs) in data["tracks"].items():
                segs = [encode_mask(stack[t]) if present[t] else None for t in range(len(present))]
                tracks.append(RawMasks(video_id=int(video_id), annotation_id=int(aid), source=str(source),
                                       segmentations=segs,
                                       confidences=[None if c is None else float(c) for c in confs]))
            rows = pickle.dumps(rows_from_raw_masks(tracks, H, W))
        out["video_id"].append(int(video_id))
        out["source"].append(str(source))
        out["rows"].append(rows)
        out["error"].append(str(error))
    return out


def run_cpu_source(batch: dict[str, np.ndarray], *, name: str, options: dict, plugins: list[str],
                    data_dir: str, annotations: str | None) -> dict[str, list]:
    """CPU-task sources: built once per worker process (cached), then run like an actor."""
    key = json.dumps(options, sort_keys=True)
    return _cpu_runner(name, key, tuple(plugins), data_dir, annotations)(batch)


@functools.lru_cache(maxsize=8)
def _cpu_runner(name: str, options_json: str, plugins: tuple, data_dir: str, annotations: str | None) -> SourceRunner:
    return SourceRunner(name, json.loads(options_json), list(plugins), data_dir, annotations)
