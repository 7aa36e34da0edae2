"""The one interface every pseudo-mask source implements, and the registry that builds them.

A source takes one video (frames + ground-truth boxes per annotation) and returns, for every
annotation and every frame where it has a box, a binary mask and a confidence. The Ray Data
pipeline (``pmvis.platform.pseudo.generate``) only knows this interface: a new source registers a
config class and a builder here and is immediately usable by ``pmvis pseudo-masks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from pmvis.core.config import StrictConfig
from pmvis.core.errors import PmvisError

Box = list[float]  # [x, y, w, h] in pixels


@dataclass
class VideoInput:
    """What a source sees of one video."""

    video_id: int
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    boxes: dict[int, list[Box | None]]  # annotation id -> per-frame box (None: absent)
    categories: dict[int, int] = field(default_factory=dict)  # annotation id -> category id
    # Masks another source produced for this video (the track source starts from them).
    init_masks: dict[int, "SourceMasks"] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])


@dataclass
class SourceMasks:
    """One annotation's per-frame masks (bool (H, W) or None) and confidences (None where no mask)."""

    masks: list[np.ndarray | None]
    confidences: list[float | None]


class PseudoMaskSource(Protocol):
    name: str

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]: ...


class SourceConfig(StrictConfig):
    """Resources shared by every source; subclasses add the source's own knobs."""

    num_gpus: float = 0.0  # per actor; 0 runs on CPU
    actors: int = 1  # actor-pool size for model sources


@dataclass
class SourceSpec:
    config_cls: type[SourceConfig]
    build: Callable[[Any], PseudoMaskSource]
    uses_model: bool  # model sources run in an actor pool; others in CPU tasks
    needs_init_from: str | None = None  # name of the source whose masks seed this one


SOURCES: dict[str, SourceSpec] = {}


def register_source(name: str, spec: SourceSpec) -> None:
    SOURCES[name] = spec


def _load_builtin_sources() -> None:
    # Importing a module registers its source; kept lazy so `import pmvis` stays light.
    from pmvis.models.sources import boxinst, grabcut, hqsam, propagate  # noqa: F401


def get_source_spec(name: str) -> SourceSpec:
    if name in SOURCES:
        return SOURCES[name]
    _load_builtin_sources()
    if name not in SOURCES:
        raise PmvisError(f"unknown pseudo-mask source {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def build_source(name: str, config: SourceConfig | dict | None = None) -> PseudoMaskSource:
    spec = get_source_spec(name)
    if not isinstance(config, spec.config_cls):
        from pmvis.core.config import build_config

        config = build_config(spec.config_cls, dict(config or {}), source=f"source {name}")
    return spec.build(config)
