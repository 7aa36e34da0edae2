"""What a pseudo-mask run will do, checked before Ray starts, and the manifest that records it.

:func:`prepare_pseudo_masks` validates the annotation file, each source's options against its
typed config and every ``*checkpoint`` option (a readable torch file), orders the sources by
dependency and fingerprints each one; OUT/manifest.json records the fingerprints, so a rerun
reuses stored videos only when the inputs that made them are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pmvis.core.config import StrictConfig
from pmvis.core.errors import PmvisError
from pmvis.core.io import read_json, write_json_atomic
from pmvis.models.sources.base import get_source_spec
from pmvis.platform.data.ytvis import YTVISDataset
from pmvis.platform.data.ytvis_io import load_dataset_dir
from pmvis.platform.pseudo.store import (
    RAW_DIRNAME,
    done_videos,
    stored_sources,
)
from pmvis.platform.pseudo.workers import import_plugins

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


# A torch checkpoint is a zip archive (torch >= 1.6) holding ``<name>/data.pkl``, or a legacy
# pickle stream (first byte: the pickle PROTO opcode).
_PICKLE_PROTO = 0x80


class PseudoMaskConfig(StrictConfig):
    """Every knob of a `pmvis pseudo-masks` run (recorded in OUT/manifest.json)."""

    sources: list[str] = ["grabcut"]
    # Per-source options, validated against the source's own config class (see models/sources).
    source_options: dict[str, dict[str, Any]] = {}
    # Modules imported on the driver and in every worker before sources are built: they may
    # register extra sources with pmvis.models.sources.base.register_source.
    plugins: list[str] = []


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


def read_manifest(out_dir: Path) -> dict[str, Any]:
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
    import_plugins(config.plugins)
    dataset = load_dataset_dir(data_dir, annotations, check_frames=False)
    configs = {name: _source_config(name, config.source_options.get(name, {}))
               for name in dict.fromkeys(config.sources)}
    files = {name: _checkpoint_files(name, cfg) for name, cfg in configs.items()}
    raw_dir = out_dir / RAW_DIRNAME
    recorded = read_manifest(out_dir).get("sources") or {}
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


def what_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A short account of why stored masks are stale."""
    if not old:
        return "no record of the inputs that produced the stored masks"
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:MAX_CHANGES_SHOWN]]
    more = f"; {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return "inputs changed: " + "; ".join(shown) + more


def write_manifest(plan: PseudoMaskPlan, records: dict[str, dict], runs: list[dict]) -> None:
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
