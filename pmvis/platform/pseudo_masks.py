"""The pseudo-mask generation pipeline on Ray Data.

One Ray Data job per source over the videos not yet in the store:

    from_items(videos) ─► run source (model sources: actor pool, GPUs from config;
                                      others: CPU tasks)
                      ─► RLE-encode (CPU tasks)
                      ─► driver writes one Parquet file per (source, video), atomically

Sources run in dependency order (``track`` starts from ``hqsam``'s masks, which the driver reads
from the store and ships with each video). A video that fails (corrupt frame, bad boxes) comes
back as an error row with its id and reason while the others finish; the run then raises one
error listing all failures. A killed actor is restarted by Ray and its video retried (Ray Data's
actor pools default to unlimited restarts and task retries; CPU tasks to Ray's task retries);
files are keyed by (source, video), so a retry can never duplicate rows. A rerun skips stored
videos.
"""

from __future__ import annotations

import functools
import importlib
import json
import pickle
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pmvis.platform.config import StrictConfig, dump_config
from pmvis.platform.errors import PmvisError
from pmvis.platform.io import write_json_atomic
from pmvis.platform.raw_masks import (
    RAW_DIRNAME,
    RawTrack,
    done_videos,
    read_raw,
    rows_from_tracks,
    stored_sources,
    write_video_rows,
)
from pmvis.platform.ytvis import encode_mask, load_dataset_dir

MANIFEST_FILENAME = "manifest.json"


class PseudoMaskConfig(StrictConfig):
    """Every knob of a `pmvis pseudo-masks` run (recorded in OUT/manifest.json)."""

    sources: list[str] = ["grabcut"]
    # Per-source options, validated against the source's own config class (see models/sources).
    source_options: dict[str, dict[str, Any]] = {}
    # Modules imported on the driver and in every worker before sources are built: they may
    # register extra sources with pmvis.models.sources.base.register_source.
    plugins: list[str] = []


@dataclass
class RunSummary:
    written: dict[str, int] = field(default_factory=dict)  # source -> videos written this run
    skipped: dict[str, int] = field(default_factory=dict)  # source -> videos already stored
    failures: list[dict] = field(default_factory=list)  # {source, video_id, error}
    seconds: float = 0.0


# ----------------------------------------------------------------------------- worker side


def _import_plugins(plugins: list[str]) -> None:
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
    from pmvis.platform.ytvis import ANNOTATIONS_FILENAME

    path = Path(data_dir) / (annotations or ANNOTATIONS_FILENAME)
    return _cached_dataset(data_dir, annotations, path.stat().st_mtime_ns)


def _video_input(data_dir: str, annotations: str | None, video_id: int, init_blob: bytes | None):
    from pmvis.models.sources.base import SourceMasks, VideoInput

    ds = _dataset(data_dir, annotations)
    anns = ds.annotations_by_video()[video_id]
    init: dict[int, SourceMasks] = {}
    if init_blob:
        from pmvis.platform.ytvis import decode_mask

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


class _SourceRunner:
    """Builds a source once per worker and applies it to batches of videos (batch_size=1)."""

    def __init__(self, name: str, options: dict, plugins: list[str], data_dir: str, annotations: str | None):
        _import_plugins(plugins)
        from pmvis.models.sources.base import build_source

        self.name = name
        self.source = build_source(name, options)
        self.data_dir = data_dir
        self.annotations = annotations

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"video_id": [], "source": [], "payload": [], "error": []}
        for video_id, init_blob in zip(batch["video_id"], batch["init"]):
            video_id = int(video_id)
            payload, error = b"", ""
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


def _encode_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """CPU stage: binary masks → compressed RLE rows, ready for the store."""
    out: dict[str, list] = {"video_id": [], "source": [], "rows": [], "error": []}
    for video_id, source, payload, error in zip(batch["video_id"], batch["source"], batch["payload"], batch["error"]):
        rows = b""
        if not error:
            data = pickle.loads(payload)
            H, W = data["size"]
            tracks = []
            for aid, (stack, present, confs) in data["tracks"].items():
                segs = [encode_mask(stack[t]) if present[t] else None for t in range(len(present))]
                tracks.append(RawTrack(video_id=int(video_id), annotation_id=int(aid), source=str(source),
                                       segmentations=segs,
                                       confidences=[None if c is None else float(c) for c in confs]))
            rows = pickle.dumps(rows_from_tracks(tracks, H, W))
        out["video_id"].append(int(video_id))
        out["source"].append(str(source))
        out["rows"].append(rows)
        out["error"].append(str(error))
    return out


# ----------------------------------------------------------------------------- driver side


def _init_source(name: str, options: dict[str, Any]) -> str | None:
    """The source whose masks seed ``name``: its config's ``init_from`` knob, else the spec's default."""
    from pmvis.models.sources.base import get_source_spec

    spec = get_source_spec(name)
    cfg = spec.config_cls.model_validate(options.get(name, {}))
    return getattr(cfg, "init_from", None) or spec.needs_init_from


def _source_order(sources: list[str], available_init: set[str], options: dict[str, Any]) -> list[str]:
    """Dependency order: a source that starts from another's masks runs after it."""
    ordered: list[str] = []
    pending = list(dict.fromkeys(sources))
    while pending:
        progressed = False
        for name in list(pending):
            dep = _init_source(name, options)
            if dep is None or dep in ordered or (dep not in pending and dep in available_init):
                ordered.append(name)
                pending.remove(name)
                progressed = True
        if not progressed:
            name = pending[0]
            dep = _init_source(name, options)
            raise PmvisError(f"source {name!r} starts from {dep!r} masks: add {dep!r} to --sources "
                             f"(or run it first into the same --out)")
    return ordered


def _init_blobs(raw_dir: Path, dep: str, video_ids: list[int]) -> dict[int, bytes]:
    tracks = read_raw(raw_dir, sources=[dep])
    per_video: dict[int, dict[int, tuple]] = {}
    for t in tracks:
        per_video.setdefault(t.video_id, {})[t.annotation_id] = (t.segmentations, t.confidences)
    return {vid: pickle.dumps(per_video.get(vid, {})) for vid in video_ids}


def _write_manifest(out_dir: Path, data_dir: Path, annotations: str | None, config: PseudoMaskConfig,
                    summary: RunSummary) -> None:
    path = out_dir / MANIFEST_FILENAME
    previous = json.loads(path.read_text()) if path.exists() else {}
    runs = previous.get("runs", [])
    runs.append({
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "written": summary.written, "skipped": summary.skipped,
        "failures": summary.failures, "seconds": round(summary.seconds, 2),
    })
    from pmvis.models.sources.base import get_source_spec

    raw_dir = out_dir / RAW_DIRNAME
    manifest = {
        "data": str(data_dir.resolve()),
        "annotations": annotations,
        "config": config.model_dump(mode="json"),
        "source_configs": {
            name: get_source_spec(name).config_cls.model_validate(config.source_options.get(name, {}))
            .model_dump(mode="json")
            for name in config.sources
        },
        "stored_videos": {name: len(done_videos(raw_dir, name)) for name in config.sources},
        "runs": runs,
    }
    write_json_atomic(path, manifest, indent=2)


def generate_pseudo_masks(
    data_dir: str | Path,
    out_dir: str | Path,
    config: PseudoMaskConfig,
    *,
    annotations: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run every configured source over the videos it has not stored yet (Ray must be connected).

    Raises PmvisError listing the failed videos after every other video has been written.
    """
    import ray.data
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    from pmvis.models.sources.base import get_source_spec

    start = time.perf_counter()
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    _import_plugins(config.plugins)
    dataset = load_dataset_dir(data_dir, annotations, check_frames=False)
    raw_dir = out_dir / RAW_DIRNAME
    raw_dir.mkdir(parents=True, exist_ok=True)
    all_videos = sorted(dataset.videos)
    available = set(stored_sources(raw_dir))
    summary = RunSummary()
    ctx = ray.data.DataContext.get_current()
    # Our own per-source bar (below) shows progress with an ETA; Ray Data's bars, which outside a
    # terminal become a multi-line "logging_progress" block every few seconds, stay off.
    ctx.enable_progress_bars = False

    for name in _source_order(config.sources, available, config.source_options):
        spec = get_source_spec(name)
        options = config.source_options.get(name, {})
        src_cfg = spec.config_cls.model_validate(options)  # validate on the driver: fail fast
        done = done_videos(raw_dir, name)
        todo = [v for v in all_videos if v not in done]
        summary.skipped[name] = len(all_videos) - len(todo)
        summary.written[name] = 0
        if not todo:
            continue
        dep = _init_source(name, config.source_options)
        blobs = _init_blobs(raw_dir, dep, todo) if dep else {}
        items = [{"video_id": v, "init": blobs.get(v, b"")} for v in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        runner_kwargs = dict(name=name, options=options, plugins=config.plugins, data_dir=str(data_dir),
                             annotations=annotations)
        if spec.uses_model:
            ds = ds.map_batches(
                _SourceRunner, fn_constructor_kwargs=runner_kwargs, batch_size=1,
                compute=ActorPoolStrategy(size=max(1, min(src_cfg.actors, len(todo)))),
                num_gpus=src_cfg.num_gpus or None, num_cpus=1,
            )
        else:
            ds = ds.map_batches(
                _run_cpu_source, fn_kwargs=runner_kwargs, batch_size=1, num_cpus=1,
            )
        ds = ds.map_batches(_encode_batch, batch_size=1, num_cpus=1)
        bar = tqdm(total=len(todo), desc=f"pseudo-masks [{name}]", unit="video", disable=not progress)
        for row in ds.iter_rows():
            vid = int(row["video_id"])
            if row["error"]:
                summary.failures.append({"source": name, "video_id": vid, "error": row["error"]})
            else:
                write_video_rows(raw_dir, name, vid, pickle.loads(row["rows"]))
                summary.written[name] += 1
            bar.update(1)
        bar.close()

    summary.seconds = time.perf_counter() - start
    _write_manifest(out_dir, data_dir, annotations, config, summary)
    if summary.failures:
        lines = [f"  {f['source']}: video id={f['video_id']}: {f['error'].splitlines()[0]}" for f in summary.failures]
        raise PmvisError(f"{len(summary.failures)} video(s) failed (the others were written to {raw_dir}):\n"
                         + "\n".join(lines))
    return summary


def _run_cpu_source(batch: dict[str, np.ndarray], *, name: str, options: dict, plugins: list[str],
                    data_dir: str, annotations: str | None) -> dict[str, list]:
    """CPU-task sources: built once per worker process (cached), then run like an actor."""
    key = json.dumps(options, sort_keys=True)
    return _cpu_runner(name, key, tuple(plugins), data_dir, annotations)(batch)


@functools.lru_cache(maxsize=8)
def _cpu_runner(name: str, options_json: str, plugins: tuple, data_dir: str, annotations: str | None) -> _SourceRunner:
    return _SourceRunner(name, json.loads(options_json), list(plugins), data_dir, annotations)


def describe_config(config: PseudoMaskConfig) -> str:
    return dump_config(config)
