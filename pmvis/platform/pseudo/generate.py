"""The pseudo-mask generation pipeline on Ray Data.

One Ray Data job per source over the videos not yet in the store:

    from_items(videos) ─► run source (model sources: actor pool, GPUs from config;
                                      others: CPU tasks)
                      ─► RLE-encode (CPU tasks)
                      ─► driver writes one Parquet file per (source, video), atomically

Every input is checked before Ray starts (:func:`prepare_pseudo_masks`: the annotation file, each
source's options against its typed config, that each ``*checkpoint`` option names a readable torch
file), so bad input never costs a Ray start-up and is never retried.

Sources run in dependency order (``track`` starts from ``hqsam``'s masks, which each worker reads
from the store for its video). Rows between the stages are plain and tensor columns
(:mod:`pmvis.platform.pseudo.workers`), never pickled objects. A video that fails (corrupt frame, bad boxes) comes
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

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import ray.data
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from pmvis.core.errors import PmvisError
from pmvis.models.sources.base import get_source_spec
from pmvis.platform.pseudo.plan import (
    PseudoMaskConfig,
    PseudoMaskPlan,
    prepare_pseudo_masks,
    read_manifest,
    what_changed,
    write_manifest,
)
from pmvis.platform.pseudo.store import (
    clear_source,
    done_videos,
    write_video_rows,
)
from pmvis.platform.pseudo.workers import SourceRunner, encode_batch, run_cpu_source, store_rows

# Attempts after the first for a (source, video) whose worker crashed (segfault, OOM kill, lost
# actor). Errors raised by a source are never retried: they come back as the video's error row.
MAX_TASK_RETRIES = 1
_RAY_DATA_LOGGER = "ray.data"


@dataclass
class RunSummary:
    written: dict[str, int] = field(default_factory=dict)  # source -> videos written this run
    skipped: dict[str, int] = field(default_factory=dict)  # source -> videos already stored
    failures: list[dict] = field(default_factory=list)  # {source, video_id, error}
    # source -> why its stored videos were deleted and regenerated (its inputs changed)
    regenerated: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- driver side


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


def _source_pipeline(todo: list[int], runner_kwargs: dict[str, Any], *, uses_model: bool, actors: int,
                     num_gpus: float) -> Any:
    """The Ray Data job of one source: its videos → the source (an actor pool for model sources,
    CPU tasks for the others) → RLE encoding."""
    ds = ray.data.from_items([{"video_id": v} for v in todo], override_num_blocks=len(todo))
    # Ray 2.60 warns that retry counts passed as remote args are deprecated, but offers no named
    # parameter for them yet; bounded retries are what keeps one crashing video from hanging a run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        if uses_model:
            ds = ds.map_batches(
                SourceRunner, fn_constructor_kwargs=runner_kwargs, batch_size=1,
                compute=ActorPoolStrategy(size=max(1, min(actors, len(todo)))), num_gpus=num_gpus or None, num_cpus=1,
                # Bounded: each video may crash its actor on every one of its attempts, no more.
                max_restarts=(1 + MAX_TASK_RETRIES) * len(todo), max_task_retries=MAX_TASK_RETRIES,
            )
        else:
            ds = ds.map_batches(run_cpu_source, fn_kwargs=runner_kwargs, batch_size=1, num_cpus=1,
                                max_retries=MAX_TASK_RETRIES)
        return ds.map_batches(encode_batch, batch_size=1, num_cpus=1, max_retries=MAX_TASK_RETRIES)


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
    manifest = read_manifest(plan.out_dir)
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
                    summary.regenerated[name] = what_changed((records.get(name) or {}).get("inputs"), sp.inputs)
                    clear_source(raw_dir, name)
                    done = set()
                # Recorded before any stored video is reused or written: every file under the source
                # is then made from these inputs.
                records[name] = {"fingerprint": sp.fingerprint, "inputs": sp.inputs}
                write_manifest(plan, records, runs)
                todo = [v for v in all_videos if v not in done]
                summary.skipped[name] = len(all_videos) - len(todo)
                summary.written[name] = 0
                if not todo:
                    continue
                runner_kwargs = dict(name=name, options=sp.options, plugins=plan.config.plugins,
                                     data_dir=str(plan.data_dir), annotations=plan.annotations,
                                     raw_dir=str(raw_dir), init_from=sp.init_from)
                ds = _source_pipeline(todo, runner_kwargs, uses_model=spec.uses_model, actors=sp.config.actors,
                                      num_gpus=sp.config.num_gpus)
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
                        write_video_rows(raw_dir, name, vid, store_rows(row))
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
        write_manifest(plan, records, runs)
    if setup_error:
        raise PmvisError(setup_error)
    if summary.failures:
        lines = [f"  {f['source']}: video id={f['video_id']}: {f['error'].splitlines()[0]}" for f in summary.failures]
        raise PmvisError(f"{len(summary.failures)} video(s) failed (the others were written to {raw_dir}):\n"
                         + "\n".join(lines))
    return summary


