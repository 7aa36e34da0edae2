"""The training progress line and its cadence, and the filters that keep Ray's start-up noise off
the console without hiding errors. No Ray, no training: fakes for the clock and the loss terms."""

from __future__ import annotations

import logging
import sys

import pytest

from pmvis.platform.progress import ProgressPrinter, format_progress, main_terms
from pmvis.platform.ray_logs import (
    AUTOSCALING_CLIENT_LOGGER,
    TOKEN_AUTH_ENABLED_NOTICE,
    TOKEN_AUTH_LOGGER,
    DropMessage,
    TransientTimeoutFilter,
    job_runtime_env,
)

# What TrainingLoop.step returns for loss.mode boxinst with 2 decoder layers (aux layer "_0").
TERMS = {"class_0": 0.9, "l1_0": 0.26, "giou_0": 1.07, "proj_0": 1.2, "pairwise_0": 0.67, "class": 0.41,
         "l1": 0.1, "giou": 0.33, "proj": 1.234, "pairwise": 0.5697, "track": 1.83, "track_aux": 0.42,
         "loss": 5.1234, "grad_norm": 16.7}


def test_format_progress_prints_main_terms_in_order_eta_and_run_name():
    line = format_progress(120, 600, TERMS, lr=1e-3, it_per_s=4.0, run_name="box_only")
    assert line == ("[box_only] eta: 0:02:00  iter: 120/600  it/s: 4  total_loss: 5.123  class: 0.41  giou: 0.33  "
                    "l1: 0.1  proj: 1.234  pairwise: 0.5697  track: 1.83  track_aux: 0.42  lr: 1.0e-03")
    assert "_0" not in line and "grad_norm" not in line
    # No speed yet: no ETA; no run name: no prefix; a mode's own mask terms follow the box terms.
    pm = {"loss": 2.0, "class": 0.5, "pseudo_focal": 0.2, "pseudo_dice": 0.3, "pseudo_dice_1": 9.0, "new_term": 1.0}
    assert format_progress(1, 10, pm) == ("eta: -  iter: 1/10  it/s: -  total_loss: 2  class: 0.5  pseudo_focal: 0.2  "
                                          "pseudo_dice: 0.3  new_term: 1")
    assert list(main_terms({"mask_dice": 1, "class": 1, "tk": 1, "tk_3": 1})) == ["class", "mask_dice", "tk"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_every_n_and_last_iteration_mean_losses_and_eta_without_pauses():
    clock, lines = FakeClock(), []
    p = ProgressPrinter(10, 4, run_name="r", emit=lines.append, clock=clock)
    lrs = lambda: {"lr": 1e-4, "lr_backbone": 1e-5}  # noqa: E731
    for it in range(1, 11):
        clock.t += 10.0 if it == 1 else 0.5  # the first step (start-up) is slow and not counted
        p.step_done(it, {"loss": float(it), "class": 1.0, "class_0": 7.0}, lrs)
        if it == 6:
            clock.t += 100.0  # an evaluation / checkpoint: not training time
            p.resume()
    assert [line.split("iter: ")[1].split()[0] for line in lines] == ["4/10", "8/10", "10/10"]
    assert lines[0] == "[r] eta: 0:00:03  iter: 4/10  it/s: 2  total_loss: 2.5  class: 1  lr: 1.0e-04"
    assert "total_loss: 6.5" in lines[1] and "it/s: 2 " in lines[1]  # the pause at 6 is not in the speed
    assert lines[2].startswith("[r] eta: 0:00:00  iter: 10/10") and "total_loss: 9.5" in lines[2]


def test_progress_is_silent_on_other_ranks_and_when_off():
    for p in (ProgressPrinter(4, 1, enabled=False, emit=pytest.fail), ProgressPrinter(4, 0, emit=pytest.fail)):
        for it in range(1, 5):
            p.step_done(it, {"loss": 1.0}, dict)


def test_progress_sums_tensors_without_reading_them_every_step():
    torch = pytest.importorskip("torch")
    lines = []
    p = ProgressPrinter(2, 2, emit=lines.append)
    for it in (1, 2):
        p.step_done(it, {"loss": torch.tensor(float(it)), "grad_norm": torch.tensor(3.0)}, lambda: {"lr": 0.1})
    assert "total_loss: 1.5" in lines[0] and "lr: 1.0e-01" in lines[0]


def _record(logger: str, msg: str, level: int = logging.WARNING, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(logger, level, __file__, 1, msg, None, exc_info)


def test_ray_filters_drop_only_the_known_noise():
    from ray.exceptions import GetTimeoutError, RayActorError

    noise = "Failed to send resource request for train-1. If this only happens transiently ..."
    f = TransientTimeoutFilter(tolerated=2)
    assert not f.filter(_record(AUTOSCALING_CLIENT_LOGGER, noise, exc=GetTimeoutError("Get timed out")))
    assert f.filter(_record(AUTOSCALING_CLIENT_LOGGER, noise, exc=RayActorError()))  # a real failure: shown
    assert f.filter(_record(AUTOSCALING_CLIENT_LOGGER, "something else", exc=GetTimeoutError("x")))
    assert not f.filter(_record(AUTOSCALING_CLIENT_LOGGER, noise, exc=GetTimeoutError("again")))
    assert f.filter(_record(AUTOSCALING_CLIENT_LOGGER, noise, exc=GetTimeoutError("persists")))  # shown again

    d = DropMessage(TOKEN_AUTH_ENABLED_NOTICE)
    assert not d.filter(_record(TOKEN_AUTH_LOGGER, TOKEN_AUTH_ENABLED_NOTICE + ". Set RAY_AUTH_MODE=disabled ..."))
    assert d.filter(_record(TOKEN_AUTH_LOGGER, "Token authentication is disabled for this Ray cluster. Anyone ..."))
    try:
        raise ValueError("boom")
    except ValueError:
        error = logging.LogRecord(AUTOSCALING_CLIENT_LOGGER, logging.ERROR, __file__, 1, "boom", None, sys.exc_info())
    assert f.filter(error) and d.filter(error)


def test_worker_setup_hook_yields_to_a_submitted_jobs_own_hook(monkeypatch):
    import json

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_runtime_env() == {"worker_process_setup_hook": "pmvis.platform.ray_logs.install_worker_log_filters"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"worker_process_setup_hook": "theirs.hook"}}))
    assert job_runtime_env() == {}
