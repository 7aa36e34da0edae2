"""Test-only pseudo-mask sources, registered through the real plugin mechanism (--plugin).

`fillbox` (CPU tasks): the filled GT box, confidence 1. `fillbox_actor`: the same in an actor
pool, which kills its own actor (ray.kill) on its first call when its `kill_marker` option names a
file that does not exist yet (so exactly one kill per test). `grown`: starts from `fillbox`
masks and returns them unchanged, to check that init masks reach a dependent source.
`failing` / `failing_actor`: the filled box, but every attempt at one video crashes its worker
(SIGSEGV) or raises PmvisError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pmvis.models.sources.base import SourceConfig, SourceMasks, SourceSpec, VideoInput, register_source


def _filled(video: VideoInput) -> dict[int, SourceMasks]:
    H, W = video.size
    out = {}
    for aid, boxes in video.boxes.items():
        masks, confs = [], []
        for box in boxes:
            if box is None:
                masks.append(None)
                confs.append(None)
                continue
            m = np.zeros((H, W), bool)
            x, y, w, h = (int(round(v)) for v in box)
            m[y:y + h, x:x + w] = True
            masks.append(m)
            confs.append(1.0)
        out[aid] = SourceMasks(masks, confs)
    return out


class KillConfig(SourceConfig):
    kill_marker: str | None = None


class _KillOnce:
    name = "fillbox_actor"

    def __init__(self, cfg: KillConfig):
        self.marker = cfg.kill_marker

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        marker = self.marker
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(video.video_id))
            import ray

            ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
        return _filled(video)


class _Grown:
    name = "grown"

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        assert video.init_masks, "init masks did not reach the source"
        return dict(video.init_masks)


register_source("fillbox", SourceSpec(SourceConfig, lambda cfg: _filled, uses_model=False))
register_source("fillbox_actor", SourceSpec(KillConfig, _KillOnce, uses_model=True))
register_source("grown", SourceSpec(SourceConfig, lambda cfg: _Grown(), uses_model=False, needs_init_from="fillbox"))


class FailConfig(SourceConfig):
    fail_video: int = -1  # the video whose every attempt fails
    how: str = "segfault"  # segfault: the worker process dies (SIGSEGV); raise: the source raises PmvisError
    attempts_dir: str | None = None  # each attempt at fail_video leaves a file here (the test counts them)


class _FailOn:
    """`failing` (CPU tasks) / `failing_actor` (actor pool): the filled box, except that every
    attempt at `fail_video` crashes its worker or raises, to check that retries are bounded."""

    name = "failing"

    def __init__(self, cfg: FailConfig):
        self.cfg = cfg

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        if video.video_id == self.cfg.fail_video:
            import os
            import signal
            import uuid

            from pmvis.core.errors import PmvisError

            if self.cfg.attempts_dir:
                (Path(self.cfg.attempts_dir) / uuid.uuid4().hex).touch()
            if self.cfg.how == "raise":
                raise PmvisError(f"video id={video.video_id}: deterministic test failure")
            os.kill(os.getpid(), signal.SIGSEGV)
        return _filled(video)


register_source("failing", SourceSpec(FailConfig, _FailOn, uses_model=False))
register_source("failing_actor", SourceSpec(FailConfig, _FailOn, uses_model=True))
