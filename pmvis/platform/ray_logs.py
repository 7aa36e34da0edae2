"""Ray's console noise that pmvis turns off, each piece as narrowly as Ray allows and never an error.

What a ``pmvis train`` on a local Ray printed besides the training itself, and what is done here:

* Ray Train's INFO chatter (``ray.train.*`` loggers of the controller and the workers): "Requesting
  resources", "Started training worker group", "Setting up process group", "Moving model to
  device", "Checkpoint successfully created", "Reporting training result N: TrainingReport(…every
  metric…)" and, on every resume, the run-snapshot paragraph. :func:`ray_train_logging_config`
  sets Ray Train's own knob, ``RunConfig(logging_config=LoggingConfig(log_level=…))``, to WARNING.
  Safe: Ray Train's warnings and errors (a failed worker, its traceback) are still shown; the level
  only applies to the ``ray.train`` loggers on the console — Ray Train's system log files
  (``<session>/logs/train/ray-train-sys-*.log``) still get everything, DEBUG included.
  Two Ray Train modules name their logger by file path (``logging.getLogger(__file__)``), so the
  level misses them, among them the one-line-per-report "Reporting training result N:
  TrainingReport(…)" of every worker; :func:`install_train_worker_log_filters` (called by the
  training loop in each worker) applies the same level to those two loggers: their warnings and
  errors still show.
* "Actor with class name: 'PreemptionWatcher' … has constructor arguments in the object store and
  max_restarts > 0" (a C++ log line of the controller, so no Python filter can reach it): the
  watcher is an observability helper of Ray Train V2 that logs node drains and feeds
  ``ray.train.get_preemption_info()``. pmvis never calls that, and recovery from a lost node is
  ``FailureConfig(max_failures)`` (a restart from the last checkpoint), which does not use the
  watcher. :func:`quiet_ray_train` turns it off unless the user set the variable.
* "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out" (on
  every local start): a notice that Ray chose its secure default. :func:`install_driver_log_filters`
  drops that one message of that one logger in the driver (``connect`` installs it); the opposite
  warning, that a cluster runs *without* authentication, is still shown.
* "Failed to send resource request for train-… If this only happens transiently during network
  partition or CPU being overloaded, it's safe to ignore this error" with a 20-line
  ``GetTimeoutError`` traceback, from the Train controller, when the autoscaling coordinator actor
  it creates on first use takes over 5 s to start (a busy laptop). :class:`TransientTimeoutFilter`
  drops the first :data:`TOLERATED_TIMEOUTS` such timeouts of a process: the request is re-sent
  every 20 s, so a timeout that persists shows again, and any other exception there is shown at
  once. It is installed in Ray's worker processes by :func:`install_worker_log_filters`, the
  ``worker_process_setup_hook`` that :func:`pmvis.platform.cluster.connect` sets.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Ray Train's console level for its own ``ray.train.*`` loggers (Ray's default: INFO).
RAY_TRAIN_CONSOLE_LOG_LEVEL = "WARNING"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # propagated by Ray to the controller
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_ENABLED_NOTICE = "Token authentication is enabled for this Ray cluster"
# The Train controller's autoscaling client, and the warnings it logs when the coordinator is slow.
AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
RESOURCE_REQUEST_WARNINGS = ("Failed to send resource request", "Failed to cancel resource request")
TOLERATED_TIMEOUTS = 3  # per process: ~1 minute of re-sent requests (one every 20 s)
WORKER_SETUP_HOOK = f"{__name__}.install_worker_log_filters"
# Ray Train modules whose logger is named by their file path (not under "ray.train").
PATH_NAMED_TRAIN_LOGGER_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.collective.collectives")
SUBMITTED_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def ray_train_logging_config() -> Any:
    """The ``RunConfig(logging_config=…)`` of pmvis trainings: Ray Train's INFO chatter off the console."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LOG_LEVEL)


def quiet_ray_train() -> None:
    """Before a ``TorchTrainer`` is built: no preemption watcher unless the user asked for one."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


class DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class MinLevel(logging.Filter):
    """Drops the records below ``level``."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.levelno = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.levelno


class TransientTimeoutFilter(logging.Filter):
    """Drops Ray Train's autoscaling-request warnings whose cause is a ``GetTimeoutError``, the
    first ``tolerated`` times in a process; every other record passes."""

    def __init__(self, tolerated: int = TOLERATED_TIMEOUTS) -> None:
        super().__init__()
        self.tolerated = tolerated
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (self.dropped < self.tolerated and isinstance(exc, TimeoutError)  # ray's GetTimeoutError is one
                and str(record.msg).startswith(RESOURCE_REQUEST_WARNINGS)):
            self.dropped += 1
            return False
        return True


def _add_filter(logger_name: str, new: logging.Filter) -> None:
    """Add ``new`` to a logger once (connect may run again in the same process)."""
    target = logging.getLogger(logger_name)
    if not any(type(f) is type(new) for f in target.filters):
        target.addFilter(new)


def job_runtime_env() -> dict[str, Any]:
    """``ray.init(runtime_env=…)`` of pmvis drivers: the worker setup hook, unless the submitted job
    already has one of its own (Ray refuses two; theirs wins, and only the filter is lost)."""
    import json

    submitted = json.loads(os.environ.get(SUBMITTED_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    if "worker_process_setup_hook" in submitted:
        return {}
    return {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def install_driver_log_filters() -> None:
    """In the process that calls ``ray.init`` (before it does)."""
    _add_filter(TOKEN_AUTH_LOGGER, DropMessage(TOKEN_AUTH_ENABLED_NOTICE))


def install_worker_log_filters() -> None:
    """Ray's ``worker_process_setup_hook`` (runs once in every worker process of the job)."""
    _add_filter(AUTOSCALING_CLIENT_LOGGER, TransientTimeoutFilter())


def install_train_worker_log_filters() -> None:
    """In a Ray Train worker: Ray Train's console level also for its loggers named by file path."""
    for name in PATH_NAMED_TRAIN_LOGGER_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            _add_filter(module.__file__, MinLevel(RAY_TRAIN_CONSOLE_LOG_LEVEL))
