"""A run's checkpoint directories: naming, the record that proves a copy whole, finding the newest.

Every ``checkpoint_every`` iterations and at the end, rank 0 writes ``checkpoint.pt``
(:func:`pmvis.models.vis.checkpoint.save_checkpoint`) and then its record ``pmvis_meta.json`` with
the file's size and SHA-256 (:func:`write_checkpoint_dir`) into a temporary directory and passes it
to ``ray.train.report``, which copies it into storage; that copy is not atomic (a full disk leaves
a truncated file), so a checkpoint is only used after :func:`verify_checkpoint` — one that fails is
skipped with a warning for the one before. Temporary directories of killed workers are removed
when a worker starts. Directories are named ``checkpoint_<iteration>``; ``keep_checkpoints`` most
recent are kept. Remote storage (``s3://``…) is not scanned: there Ray's record is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ray.train import Result

from pmvis.core.errors import PmvisError
from pmvis.core.io import write_json_atomic
from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME, config_fingerprint, file_record, read_checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_META = "pmvis_meta.json"


CHECKPOINT_PREFIX = "checkpoint_"  # checkpoint directories: checkpoint_<iteration, 8 digits>


TEMP_CHECKPOINT_PREFIX = "pmvis-ckpt-"  # a worker's checkpoint before Ray copies it: pmvis-ckpt-<pid>-*



def is_remote(path: str) -> bool:
    return "://" in path


def temp_checkpoint_prefix(pid: int) -> str:
    return f"{TEMP_CHECKPOINT_PREFIX}{pid}-"


def remove_stale_temp_checkpoints(temp_dir: str | os.PathLike | None = None) -> list[Path]:
    """Delete the temporary checkpoint directories of workers that are gone (a worker killed while
    writing one, e.g. by Ctrl-C, cannot clean up after itself); returns what was removed."""
    removed = []
    for d in Path(temp_dir or tempfile.gettempdir()).glob(f"{TEMP_CHECKPOINT_PREFIX}*-*"):
        pid = d.name[len(TEMP_CHECKPOINT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def checkpoint_dir_name(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:08d}"


def write_checkpoint_dir(loop: Any, directory: str | os.PathLike, extra: Mapping[str, Any]) -> Path:
    """``checkpoint.pt`` and then its record ``pmvis_meta.json`` (iteration, model config, MLflow
    run, and the size and SHA-256 of checkpoint.pt): the record lets a reader tell a complete copy
    in storage from one cut short (:func:`verify_checkpoint`)."""
    directory = Path(directory)
    loop.save(directory / CHECKPOINT_FILENAME, **extra)
    files = {CHECKPOINT_FILENAME: file_record(directory / CHECKPOINT_FILENAME)}
    record = {"iteration": loop.iteration, "fingerprint": config_fingerprint(loop.cfg.model),
              "model_config": loop.cfg.model.model_dump(mode="json"), "files": files, **extra}
    write_json_atomic(directory / CHECKPOINT_META, record, indent=1)
    return directory


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """A local run's ``checkpoint_<iteration>`` directories, newest first."""
    found = []
    for d in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = d.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and d.is_dir():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint of a run (None: no run / no checkpoint).

    A local run is read from its ``checkpoint_*`` directories, not from Ray's snapshot file: the
    snapshot may be missing (an interrupted run) or name a checkpoint whose copy into storage was
    cut short. A checkpoint that fails :func:`verify_checkpoint` is skipped with a warning; when
    there are checkpoints but none is complete, that is a PmvisError (never silently start over)."""
    run_dir = str(run_dir)
    if is_remote(run_dir):
        return _ray_latest_checkpoint(run_dir)
    problems = []
    for d in checkpoint_dirs(run_dir):
        try:
            verify_checkpoint(d)
            return str(d)
        except PmvisError as e:
            logger.warning("skipping incomplete checkpoint %s: %s", d, e)
            problems.append(str(e))
    if problems:
        raise PmvisError(f"{run_dir}: no complete checkpoint to resume from ({'; '.join(problems[:3])}); "
                         "remove the broken checkpoint_* directories to start the run over")
    return None


def _ray_latest_checkpoint(run_dir: str) -> str | None:
    """The latest checkpoint Ray Train recorded (remote storage, which is not scanned)."""
    try:
        result = Result.from_path(run_dir)
    except Exception as e:  # noqa: BLE001 — a broken or foreign directory
        raise PmvisError(f"{run_dir}: cannot read the Ray Train run record: {e}") from None
    return None if result.checkpoint is None else str(result.checkpoint.path)


def read_checkpoint_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """``pmvis_meta.json`` of a checkpoint directory (falls back to reading checkpoint.pt); a
    corrupt record is a PmvisError naming the file."""
    meta = Path(checkpoint_dir) / CHECKPOINT_META
    if meta.is_file():
        try:
            out = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PmvisError(f"{meta}: not a readable checkpoint record ({type(e).__name__}: {e})") from None
        if not isinstance(out, dict):
            raise PmvisError(f"{meta}: expected a JSON object, got {type(out).__name__}")
        out["path"] = str(meta.parent)
        return out
    state = read_checkpoint(checkpoint_dir)
    return {"iteration": state["iteration"], "fingerprint": state.get("fingerprint"),
            "model_config": state.get("model_config"), "path": state["path"], **(state.get("extra") or {})}


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of a checkpoint whose files are whole: every file listed in its ``files`` has the
    recorded size and SHA-256. A record from before ``files`` existed: checkpoint.pt must load.
    Anything else is a PmvisError naming the file."""
    meta = read_checkpoint_meta(checkpoint_dir)
    files = meta.get("files")
    if files is None:
        read_checkpoint(checkpoint_dir)
        return meta
    where = Path(checkpoint_dir) / CHECKPOINT_META
    if not isinstance(files, dict) or not files:
        raise PmvisError(f"{where}: 'files' must map file names to their size and hash")
    for name, want in files.items():
        if Path(name).name != name or not isinstance(want, dict):
            raise PmvisError(f"{where}: bad 'files' entry {name!r}")
        f = Path(checkpoint_dir) / name
        if not f.is_file():
            raise PmvisError(f"{f}: missing (the checkpoint is incomplete)")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise PmvisError(f"{f}: {size} bytes, the record says {want.get('bytes')} (an incomplete copy)")
        if file_record(f)["sha256"] != want.get("sha256"):
            raise PmvisError(f"{f}: contents differ from the record's SHA-256 (corrupt or modified)")
    return meta


def is_complete(checkpoint_dir: str) -> bool:
    try:
        verify_checkpoint(checkpoint_dir)
        return True
    except PmvisError as e:
        logger.warning("checkpoint %s is not complete in storage: %s", checkpoint_dir, e)
        return False


def final_checkpoint(run_dir: str, result: Any) -> str | None:
    """The run's newest complete checkpoint: the one Ray reports may be a copy cut short, or (a
    finished run started again without Ray's snapshot) missing."""
    reported = str(result.checkpoint.path) if result.checkpoint is not None else None
    if is_remote(run_dir):
        return reported
    latest = latest_checkpoint(run_dir)
    if reported is not None and (latest is None or Path(latest) != Path(reported)):
        logger.warning("the last reported checkpoint %s is not complete; using %s", reported, latest)
    return latest

