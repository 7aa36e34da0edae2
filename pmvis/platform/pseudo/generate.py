"""The pseudo-mask generation pipeline on Ray Data.

One Ray Data job per source over the videos not yet in the store:

    from_items(videos) ─► run source (model sources: actor pool, GPUs from config;
                                      others: CPU tasks)
                      ─► RLE-encode (CPU tasks)
                      ─► driver writes one Parquet file per (source, video), atomically

Every input is checked before Ray starts (:func:`prepare_pseudo_masks`: the annotation file, each
source's options against its typed config, that each ``*checkpoint`` option names a readable torch
file), so bad input never costs a Ray start-up and is never retried.

Sources run in dependency order (``track`` starts from ``hqsam``'s masks, which the driver reads
from the store and ships with each video). A video that fails (corrupt frame, bad boxes) comes
back as an error row with its id and reason while the others finish; the run then raises one
error listing all failures. A source error (PmvisError or any exception) is caught in the worker
and never retried. A worker crash (segfault, OOM kill, a killed actor) is retried
``MAX_TASK_RETRIES`` times (actors are restarted); a video that still crashes is dropped from the
Ray Data job (``max_errored_blocks`` unlimited) and reported as failed with the last error Ray
gave, so one bad video can neither hang the run nor abort the others. Files are keyed by
(source, video), so a retry can never duplicate rows.

Reuse is keyed on what produced the masks: each source's *fingerprint* hashes its resolved
options (without the resource knobs ``RESOURCE_KNOBS``), the identity of every checkpoint it
loads (size and the hash of its first and last MiB), the dataset dir, the annotation file's
content hash and the fingerprint of the source it starts from. OUT/manifest.json records it per
source, written before any stored video is reused. A rerun with the same fingerprint skips stored
videos (resume); a different one deletes that source's stored videos and regenerates them (the
summary says what changed).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import pickle
import time
import traceback
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import ValidationError

from pmvis.core.config import StrictConfig
from pmvis.core.errors import PmvisError
from pmvis.core.io import read_json, write_json_atomic
from pmvis.platform.pseudo.store import (
    RAW_DIRNAME,
    RawTrack,
    done_videos,
    read_raw,
    rows_from_tracks,
    clear_source,
    stored_sources,
    write_video_rows,
)
from pmvis.platform.data.ytvis import YTVISDataset, load_dataset_dir
from pmvis.core.masks import encode_mask

MANIFEST_FILENAME = "manifest.json"
# Bump when the pipeline's output for the same inputs changes: every stored source is regenerated.
FINGERPRINT_VERSION = 1
# Source knobs that size the run without changing its masks: resuming with more actors or GPUs
# keeps the stored videos.
RESOURCE_KNOBS = frozenset({"actors", "num_gpus"})
# Source options whose name ends so are weight files: checked before Ray starts, and their
# content identity (size + hash of the first and last FILE_ID_CHUNK_BYTES) joins the fingerprint.
CHECKPOINT_KNOB_SUFFIX = "checkpoint"
FILE_ID_CHUNK_BYTES = 1024**2
# Attempts after the first for a (source, video) whose worker crashed (segfault, OOM kill, lost
# actor). Errors raised by a source are never retried: they come back as the video's error row.
MAX_TASK_RETRIES = 1
# A torch checkpoint is a zip archive (torch >= 1.6) holding ``<name>/data.pkl``, or a legacy
# pickle stream (first byte: the pickle PROTO opcode).
_PICKLE_PROTO = 0x80
_RAY_DATA_LOGGER = "ray.data"


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
    # source -> why its stored videos were deleted and regenerated (its inputs changed)
    regenerated: dict[str, str] = field(default_factory=dict)
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
    from pmvis.platform.data.ytvis import ANNOTATIONS_FILENAME

    path = Path(data_dir) / (annotations or ANNOTATIONS_FILENAME)
    return _cached_dataset(data_dir, annotations, path.stat().st_mtime_ns)


def _video_input(data_dir: str, annotations: str | None, video_id: int, init_blob: bytes | None):
    from pmvis.models.sources.base import SourceMasks, VideoInput

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


class _SourceRunner:
    """Builds a source once per worker and applies it to batches of videos (batch_size=1)."""

    def __init__(self, name: str, options: dict, plugins: list[str], data_dir: str, annotations: str | None):
        from pmvis.models.sources.base import build_source

        self.name = name
        self.data_dir = data_dir
        self.annotations = annotations
        # A source that cannot be built (weights that do not fit the model...) fails the same way
        # on every try: it becomes the run's error instead of an actor that dies and is retried.
        self.setup_error = ""
        try:
            _import_plugins(plugins)
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


def _encode_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
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


@dataclass
class SourcePlan:
    """One source of a run, resolved and checked before Ray starts."""

    name: str
    options: dict[str, Any]  # as given: shipped to the workers, which build the source from them
    config: Any  # the source's typed config (a SourceConfig subclass)
    init_from: str | None  # the source whose stored masks seed this one
    inputs: dict[str, Any]  # what its masks are made from (recorded in the manifest)
    fingerprint: str  # hash of ``inputs``: stored videos are reused only under the same one


@dataclass
class PseudoMaskPlan:
    """A checked run: :func:`prepare_pseudo_masks` makes it without Ray."""

    data_dir: Path
    out_dir: Path
    annotations: str | None
    config: PseudoMaskConfig
    dataset: YTVISDataset
    sources: list[SourcePlan]  # in run (dependency) order

    @property
    def raw_dir(self) -> Path:
        return self.out_dir / RAW_DIRNAME


def _source_config(name: str, options: dict[str, Any]) -> Any:
    """``options`` validated into the source's typed config; errors name the option."""
    from pmvis.models.sources.base import get_source_spec

    spec = get_source_spec(name)
    try:
        return spec.config_cls.model_validate(dict(options))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            knob = ".".join(str(p) for p in err["loc"])
            lines.append(f"--option {name}{'.' + knob if knob else ''}: {err['msg']} (got {err.get('input')!r})")
        raise PmvisError("\n".join(lines)) from None


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip archive holding ``<name>/data.pkl``, or a legacy pickle stream."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "data.pkl" for n in z.namelist())
    with open(path, "rb") as f:
        return f.read(1) == bytes([_PICKLE_PROTO])


def _checkpoint_files(name: str, cfg: Any) -> dict[str, Path]:
    """knob -> weight file of every ``*checkpoint`` option set, each checked to be a readable torch
    file (loading a multi-GB model on the driver just to check it would cost more than it saves)."""
    out: dict[str, Path] = {}
    for knob, value in cfg.model_dump().items():
        if not knob.endswith(CHECKPOINT_KNOB_SUFFIX) or not value:
            continue
        option = f"--option {name}.{knob}={value}"
        path = Path(str(value)).expanduser()
        if path.is_dir():
            from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME

            path = path / CHECKPOINT_FILENAME
        if not path.exists():
            raise PmvisError(f"{option}: checkpoint {path} not found")
        if not path.is_file():
            raise PmvisError(f"{option}: checkpoint {path} is not a regular file")
        try:
            plausible = _is_torch_file(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise PmvisError(f"{option}: cannot read checkpoint {path}: {e}") from None
        if not plausible:
            raise PmvisError(f"{option}: {path} is not a torch checkpoint (neither a torch zip archive nor a "
                             f"pickle; truncated or another format?)")
        out[knob] = path.resolve()
    return out


def _file_identity(path: Path) -> dict[str, Any]:
    """Size and the hash of the first and last FILE_ID_CHUNK_BYTES: cheap for multi-GB weights, and
    survives a copy or a touch (unlike mtime)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FILE_ID_CHUNK_BYTES))
        if size > FILE_ID_CHUNK_BYTES:
            f.seek(max(size - FILE_ID_CHUNK_BYTES, FILE_ID_CHUNK_BYTES))
            h.update(f.read())
    return {"size": size, "sha256_ends": h.hexdigest()}


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST_FILENAME
    if not path.exists():
        return {}
    try:
        manifest = read_json(path)
    except PmvisError as e:
        raise PmvisError(f"{e}; delete the manifest to regenerate every source") from None
    if not isinstance(manifest, dict):
        raise PmvisError(f"{path}: not a pmvis pseudo-masks manifest; delete it to regenerate every source")
    return manifest


def _init_source(name: str, cfg: Any) -> str | None:
    """The source whose masks seed ``name``: its config's ``init_from`` knob, else the spec's default."""
    from pmvis.models.sources.base import get_source_spec

    return getattr(cfg, "init_from", None) or get_source_spec(name).needs_init_from


def _source_order(configs: dict[str, Any], available_init: set[str]) -> list[str]:
    """Dependency order: a source that starts from another's masks runs after it."""
    ordered: list[str] = []
    pending = list(configs)
    while pending:
        progressed = False
        for name in list(pending):
            dep = _init_source(name, configs[name])
            if dep is None or dep in ordered or (dep not in pending and dep in available_init):
                ordered.append(name)
                pending.remove(name)
                progressed = True
        if not progressed:
            name = pending[0]
            dep = _init_source(name, configs[name])
            raise PmvisError(f"source {name!r} starts from {dep!r} masks: add {dep!r} to --sources "
                             f"(or run it first into the same --out)")
    return ordered


def prepare_pseudo_masks(
    data_dir: str | Path,
    out_dir: str | Path,
    config: PseudoMaskConfig,
    *,
    annotations: str | None = None,
) -> PseudoMaskPlan:
    """Check every input of a run and work out what produced each source's masks, without Ray.

    Call it before connecting: bad input (annotation file, source options, checkpoints) fails in
    seconds, not after a Ray start-up, and is never retried.
    """
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    _import_plugins(config.plugins)
    dataset = load_dataset_dir(data_dir, annotations, check_frames=False)
    configs = {name: _source_config(name, config.source_options.get(name, {}))
               for name in dict.fromkeys(config.sources)}
    files = {name: _checkpoint_files(name, cfg) for name, cfg in configs.items()}
    raw_dir = out_dir / RAW_DIRNAME
    recorded = _read_manifest(out_dir).get("sources") or {}
    with open(dataset.path, "rb") as f:
        annotations_sha = hashlib.file_digest(f, "sha256").hexdigest()
    plans: dict[str, SourcePlan] = {}
    for name in _source_order(configs, set(stored_sources(raw_dir))):
        cfg = configs[name]
        dep = _init_source(name, cfg)
        if dep is None:
            init = None
        else:
            dep_fp = plans[dep].fingerprint if dep in plans else (recorded.get(dep) or {}).get("fingerprint")
            init = {"source": dep, "fingerprint": dep_fp}
        inputs = {
            "version": FINGERPRINT_VERSION,
            "source": name,
            "options": cfg.model_dump(mode="json", exclude=set(RESOURCE_KNOBS)),
            "checkpoints": {knob: _file_identity(path) for knob, path in files[name].items()},
            "data": str(data_dir),
            "annotations_sha256": annotations_sha,
            "init_from": init,
        }
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        plans[name] = SourcePlan(name=name, options=dict(config.source_options.get(name, {})), config=cfg,
                                 init_from=dep, inputs=inputs, fingerprint=fingerprint)
    return PseudoMaskPlan(data_dir=data_dir, out_dir=out_dir, annotations=annotations, config=config,
                          dataset=dataset, sources=list(plans.values()))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


MAX_CHANGES_SHOWN = 3  # differing inputs named in a "regenerated" notice


def _what_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A short account of why stored masks are stale."""
    if not old:
        return "no record of the inputs that produced the stored masks"
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:MAX_CHANGES_SHOWN]]
    more = f"; {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return "inputs changed: " + "; ".join(shown) + more


def _init_blobs(raw_dir: Path, dep: str, video_ids: list[int]) -> dict[int, bytes]:
    tracks = read_raw(raw_dir, sources=[dep])
    per_video: dict[int, dict[int, tuple]] = {}
    for t in tracks:
        per_video.setdefault(t.video_id, {})[t.annotation_id] = (t.segmentations, t.confidences)
    return {vid: pickle.dumps(per_video.get(vid, {})) for vid in video_ids}


def _write_manifest(plan: PseudoMaskPlan, records: dict[str, dict], runs: list[dict]) -> None:
    """OUT/manifest.json: per source, the fingerprint and inputs of the files stored under it."""
    raw_dir = plan.raw_dir
    for name, record in records.items():
        record["stored_videos"] = len(done_videos(raw_dir, name))
    manifest = {
        "data": str(plan.data_dir),
        "annotations": plan.annotations,
        "config": plan.config.model_dump(mode="json"),
        "source_configs": {sp.name: sp.config.model_dump(mode="json") for sp in plan.sources},
        "stored_videos": {sp.name: records[sp.name]["stored_videos"] for sp in plan.sources if sp.name in records},
        "sources": records,
        "runs": runs,
    }
    write_json_atomic(plan.out_dir / MANIFEST_FILENAME, manifest, indent=2)


class _ErrorCollector(logging.Handler):
    """Ray Data logs (and, with ``max_errored_blocks`` < 0, then drops) the error of a block whose
    task failed for good; keep the first line of each, to report it with the lost video."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            text = str(e).strip().splitlines()
            self.errors.append(f"{type(e).__name__}: {text[0] if text else ''}")


@contextmanager
def _tolerate_lost_videos() -> Iterator[_ErrorCollector]:
    """A block (= one video) whose task still fails after its retries is dropped, not fatal to the
    whole job; its error is collected. Restores the DataContext setting afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1
    collector = _ErrorCollector()
    logger = logging.getLogger(_RAY_DATA_LOGGER)
    logger.addHandler(collector)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        ctx.max_errored_blocks = before


def _lost_error(errors: list[str]) -> str:
    attempts = 1 + MAX_TASK_RETRIES
    detail = "; ".join(dict.fromkeys(errors)) or "no error recorded (see ray-data.log of the Ray session)"
    return f"its worker failed on all {attempts} attempts (crash, out of memory or a lost node): {detail}"


def generate_pseudo_masks(
    data_dir: str | Path,
    out_dir: str | Path,
    config: PseudoMaskConfig,
    *,
    annotations: str | None = None,
    progress: bool = True,
    plan: PseudoMaskPlan | None = None,
) -> RunSummary:
    """Run every configured source over the videos it has not stored yet (Ray must be connected).

    ``plan``: from :func:`prepare_pseudo_masks` (made here when not given). Stored videos of a
    source are reused only when its fingerprint matches the manifest's; otherwise they are deleted
    and regenerated (``RunSummary.regenerated`` says why). Raises PmvisError listing the failed
    videos after every other video has been written.
    """
    import ray.data
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    from pmvis.models.sources.base import get_source_spec

    start = time.perf_counter()
    if plan is None:
        plan = prepare_pseudo_masks(data_dir, out_dir, config, annotations=annotations)
    raw_dir = plan.raw_dir
    raw_dir.mkdir(parents=True, exist_ok=True)
    all_videos = sorted(plan.dataset.videos)
    summary = RunSummary()
    # Our own per-source bar (below) shows progress with an ETA; Ray Data's bars, which outside a
    # terminal become a multi-line "logging_progress" block every few seconds, stay off.
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = _read_manifest(plan.out_dir)
    records: dict[str, dict] = dict(manifest.get("sources") or {})
    runs: list[dict] = list(manifest.get("runs") or [])
    setup_error = ""
    finished = False

    try:
        with _tolerate_lost_videos() as lost:
            for sp in plan.sources:
                name = sp.name
                spec = get_source_spec(name)
                lost.errors.clear()
                done = done_videos(raw_dir, name)
                if done and (records.get(name) or {}).get("fingerprint") != sp.fingerprint:
                    summary.regenerated[name] = _what_changed((records.get(name) or {}).get("inputs"), sp.inputs)
                    clear_source(raw_dir, name)
                    done = set()
                # Recorded before any stored video is reused or written: every file under the source
                # is then made from these inputs.
                records[name] = {"fingerprint": sp.fingerprint, "inputs": sp.inputs}
                _write_manifest(plan, records, runs)
                todo = [v for v in all_videos if v not in done]
                summary.skipped[name] = len(all_videos) - len(todo)
                summary.written[name] = 0
                if not todo:
                    continue
                blobs = _init_blobs(raw_dir, sp.init_from, todo) if sp.init_from else {}
                items = [{"video_id": v, "init": blobs.get(v, b"")} for v in todo]
                ds = ray.data.from_items(items, override_num_blocks=len(items))
                runner_kwargs = dict(name=name, options=sp.options, plugins=plan.config.plugins,
                                     data_dir=str(plan.data_dir), annotations=plan.annotations)
                if spec.uses_model:
                    ds = ds.map_batches(
                        _SourceRunner, fn_constructor_kwargs=runner_kwargs, batch_size=1,
                        compute=ActorPoolStrategy(size=max(1, min(sp.config.actors, len(todo)))),
                        num_gpus=sp.config.num_gpus or None, num_cpus=1,
                        # Bounded: each video may crash its actor on every one of its attempts, no more.
                        max_restarts=(1 + MAX_TASK_RETRIES) * len(todo), max_task_retries=MAX_TASK_RETRIES,
                    )
                else:
                    ds = ds.map_batches(_run_cpu_source, fn_kwargs=runner_kwargs, batch_size=1, num_cpus=1,
                                        max_retries=MAX_TASK_RETRIES)
                ds = ds.map_batches(_encode_batch, batch_size=1, num_cpus=1, max_retries=MAX_TASK_RETRIES)
                bar = tqdm(total=len(todo), desc=f"pseudo-masks [{name}]", unit="video", disable=not progress)
                seen: set[int] = set()
                for row in ds.iter_rows():
                    vid = int(row["video_id"])
                    seen.add(vid)
                    if row["setup_error"]:
                        setup_error = f"source {name!r} could not be built: {row['setup_error']}"
                        break
                    if row["error"]:
                        summary.failures.append({"source": name, "video_id": vid, "error": row["error"]})
                    else:
                        write_video_rows(raw_dir, name, vid, pickle.loads(row["rows"]))
                        summary.written[name] += 1
                    bar.update(1)
                bar.close()
                if setup_error:
                    break
                for vid in todo:
                    if vid not in seen:
                        summary.failures.append({"source": name, "video_id": vid, "error": _lost_error(lost.errors)})
        finished = True
    finally:
        summary.seconds = time.perf_counter() - start
        runs.append({
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "written": summary.written, "skipped": summary.skipped, "regenerated": summary.regenerated,
            "failures": summary.failures, "seconds": round(summary.seconds, 2),
            **({} if finished and not setup_error else {"aborted": True}),
        })
        _write_manifest(plan, records, runs)
    if setup_error:
        raise PmvisError(setup_error)
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


