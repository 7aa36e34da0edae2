"""One console line of training progress every N iterations (in the spirit of detectron2's
CommonMetricPrinter): ETA, iteration, speed, the main loss terms and the learning rate.

:class:`ProgressPrinter` is the cadence, a hook beside the training loop (``step_done`` after every
optimisation step, ``resume`` after work that is not training: evaluation, checkpoints, MLflow);
:func:`format_progress` is the line. Under Ray Train the line is logged by rank 0's worker, whose
root logger Ray Train sends to the worker's stderr: the driver's terminal shows it after Ray's
``(RayTrainWorker pid=…)`` prefix, and Ray Train's worker log file keeps it too.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Mapping

logger = logging.getLogger(__name__)

# The loss terms of the last decoder layer, in the order they are printed (terms of other modes,
# or new ones, follow in the criterion's order). Auxiliary decoder layers carry a "_<layer>" suffix.
MAIN_TERMS = ("class", "giou", "l1", "proj", "pairwise", "pseudo_focal", "pseudo_dice", "mask_focal",
              "mask_dice", "tk", "track", "track_aux")
TOTAL_TERM = "loss"  # the weighted sum, printed first as total_loss
NOT_LOSS_TERMS = ("grad_norm",)  # returned beside the losses by TrainingLoop.step
AUX_LAYER_SUFFIX = re.compile(r"_\d+$")
MAIN_LR = "lr"  # TrainingLoop.lrs(): the main group ("lr_backbone" etc. are not printed)
# The speed (and so the ETA) is the mean step time over this many recent iterations: smooth enough
# to ignore one slow batch, recent enough to follow a change (another job sharing the machine).
SPEED_WINDOW = 100


def main_terms(terms: Mapping[str, float]) -> dict[str, float]:
    """The printed loss terms: last decoder layer only, in :data:`MAIN_TERMS` order."""
    kept = {k: v for k, v in terms.items()
            if k != TOTAL_TERM and k not in NOT_LOSS_TERMS and not AUX_LAYER_SUFFIX.search(k)}
    ordered = {k: kept[k] for k in MAIN_TERMS if k in kept}
    ordered.update((k, v) for k, v in kept.items() if k not in ordered)
    return ordered


def format_progress(iteration: int, total: int, terms: Mapping[str, float], *, lr: float | None = None,
                    it_per_s: float | None = None, run_name: str | None = None) -> str:
    """``[run] eta: 0:01:23  iter: 120/600  it/s: 3.9  total_loss: 5.123  class: 0.41 … lr: 1.0e-03``.

    ``iteration`` counts completed iterations; the ETA is ``(total - iteration) / it_per_s``
    (``-`` while the speed is unknown). The run name tells side-by-side runs apart."""
    eta = "-"
    speed = "-"
    if it_per_s is not None and it_per_s > 0:
        eta = str(timedelta(seconds=round(max(total - iteration, 0) / it_per_s)))
        speed = f"{it_per_s:.3g}"
    parts = [f"eta: {eta}", f"iter: {iteration}/{total}", f"it/s: {speed}"]
    if TOTAL_TERM in terms:
        parts.append(f"total_loss: {terms[TOTAL_TERM]:.4g}")
    parts += [f"{k}: {v:.4g}" for k, v in main_terms(terms).items()]
    if lr is not None:
        parts.append(f"lr: {lr:.1e}")
    line = "  ".join(parts)
    return f"[{run_name}] {line}" if run_name else line


class ProgressPrinter:
    """Prints :func:`format_progress` every ``every`` iterations and after the last one.

    Losses are the mean over the iterations since the previous line (one batch is noisy); they are
    summed as the tensors ``TrainingLoop.step`` returns, so a GPU run is not synchronised every step.
    The speed is the mean step time of the last :data:`SPEED_WINDOW` iterations, not counting the
    first step of an invocation (start-up) nor the time between ``step_done`` and ``resume``
    (evaluation, checkpoints). ``enabled=False`` (ranks other than 0) or ``every=0``: silent."""

    def __init__(self, total: int, every: int, *, run_name: str | None = None, enabled: bool = True,
                 emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 window: int = SPEED_WINDOW) -> None:
        self.total, self.every, self.run_name = total, every, run_name
        self.enabled = enabled and every > 0
        self.emit = emit or logger.info
        self.clock = clock
        self._step_times: deque[float] = deque(maxlen=window)
        self._last: float | None = None  # end of the previous step (or of the last pause)
        self._sums: dict[str, Any] = {}
        self._n = 0

    def step_done(self, iteration: int, terms: Mapping[str, Any], lrs: Callable[[], Mapping[str, float]]) -> None:
        """After the step that completed ``iteration`` iterations; ``lrs`` is read only when printing."""
        if not self.enabled:
            return
        now = self.clock()
        if self._last is not None:
            self._step_times.append(now - self._last)
        self._last = now
        for k, v in terms.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._n += 1
        if iteration % self.every == 0 or iteration >= self.total:
            means = {k: float(v) / self._n for k, v in self._sums.items()}
            self.emit(format_progress(iteration, self.total, means, lr=lrs().get(MAIN_LR), it_per_s=self.it_per_s,
                                      run_name=self.run_name))
            self._sums, self._n = {}, 0
            self.resume()  # printing is not training time either

    def resume(self) -> None:
        """The loop did other work since the last step (evaluation, checkpoint): not counted as speed."""
        if self._last is not None:
            self._last = self.clock()

    @property
    def it_per_s(self) -> float | None:
        """Smoothed steady-state iterations per second (None before the second step)."""
        if not self._step_times:
            return None
        mean = sum(self._step_times) / len(self._step_times)
        return 1.0 / mean if mean > 0 else None
