"""Connecting to Ray: the same code runs on a laptop (a local Ray) and on a cluster."""

from __future__ import annotations

import os

from pmvis.core.errors import PmvisError
from pmvis.platform.ray_logs import install_driver_log_filters, job_runtime_env

# Keep a local Ray small on a laptop: object store sized for masks, not for the whole machine.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
LOCAL_DASHBOARD_HOST = "127.0.0.1"  # never reachable from other machines
# Ray's `uv run` hook (on by default when a driver runs under `uv run`) re-creates the driver's uv
# environment inside every uploaded working dir and starts each worker through `uv run`: ~1.5 s
# more per worker start on 2 cores, a fresh venv per Ray session, and concurrent workers racing to
# create it. pmvis is installed wherever it runs (`uv sync` here, cluster.yaml's setup commands on
# a cluster, `--working-dir` for job code), so its commands turn the hook off unless the user set it.
UV_RUN_HOOK_ENV = "RAY_ENABLE_UV_RUN_RUNTIME_ENV"
# Token authentication: every Ray RPC needs the cluster's token (~/.ray/auth_token, generated for a
# local Ray). pmvis turns it on itself rather than relying on Ray's default, and refuses to start a
# local Ray without it unless the user sets ALLOW_NO_AUTH_ENV=1: Ray's servers listen on every
# interface, so an unauthenticated Ray lets anyone on the network run code as this user.
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
ALLOW_NO_AUTH_ENV = "PMVIS_ALLOW_UNAUTHENTICATED_RAY"
# With metrics collection on, Ray's metrics agent serves Prometheus on 0.0.0.0; pmvis reads none
# of it, so collection is off unless the user sets the switch.
RAY_METRICS_ENV = "RAY_enable_metrics_collection"
# A local Ray is one machine's: Ray's single-machine mode (its default on macOS and Windows, this
# switch off) gives the node the loopback address, so every server it starts (GCS, raylet, object
# manager, workers, and the unauthenticated Prometheus endpoints of the dashboard and autoscaler)
# listens on 127.0.0.1 only. On Linux Ray otherwise replaces a loopback node address by the
# machine's own and listens on every interface. Only for a Ray pmvis starts: a driver joining a
# cluster needs its node's real address.
RAY_MULTI_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_installed_environment() -> None:
    """Run Ray workers in the installed environment, not through `uv run` (see UV_RUN_HOOK_ENV).

    Also turns on token authentication and (for a local Ray) off the metrics endpoint. Ray reads
    these switches when it is imported: call this before anything imports ray.
    """
    os.environ.setdefault(UV_RUN_HOOK_ENV, "0")
    os.environ.setdefault(RAY_AUTH_MODE_ENV, "token")
    os.environ.setdefault(RAY_METRICS_ENV, "0")


def check_local_auth() -> None:
    """Refuse to start a local Ray without token authentication unless the user asked for it."""
    mode = os.environ.get(RAY_AUTH_MODE_ENV, "token").lower()
    if mode != "token" and os.environ.get(ALLOW_NO_AUTH_ENV) != "1":
        raise PmvisError(
            f"{RAY_AUTH_MODE_ENV}={mode}: pmvis will not start a local Ray without token authentication "
            f"(Ray listens on every network interface, so anyone who can reach this machine could run code "
            f"as you). Unset {RAY_AUTH_MODE_ENV}, or set {ALLOW_NO_AUTH_ENV}=1 to start it anyway.")


def use_loopback_only() -> None:
    """Make the local Ray this process is about to start listen on 127.0.0.1 only (RAY_MULTI_MACHINE_ENV).

    Ray reads the switch when it is first imported (``ray_constants.ENABLE_RAY_CLUSTER``), and
    pmvis's job modules import Ray before the command line says whether a local Ray is wanted, so
    the read value is set too; the environment carries it to the processes Ray starts.
    """
    from ray._private import ray_constants

    os.environ[RAY_MULTI_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str = "auto", *, num_cpus: int | None = None) -> None:
    """``auto``: the cluster of RAY_ADDRESS or a running one, else start a local Ray;
    ``local``: always a fresh local Ray; anything else: a Ray address (``ray://…`` or ``host:port``).

    Idempotent: an already-initialised Ray in this process is reused.
    """
    import ray

    starts_local = address == "local" or (address == "auto" and not os.environ.get("RAY_ADDRESS")
                                          and not _running_cluster())
    if starts_local:
        check_local_auth()
    if ray.is_initialized():
        return
    # Every worker process of this job filters a known transient warning (pmvis.platform.ray_logs).
    job_env = {"runtime_env": job_runtime_env()}
    install_driver_log_filters()
    try:
        if starts_local:
            start_local_ray(num_cpus=num_cpus, **job_env)
        elif address == "auto":
            ray.init(address="auto" if not os.environ.get("RAY_ADDRESS") else None, **job_env)
        else:
            ray.init(address=address, **job_env)
    except ConnectionError as e:
        raise PmvisError(f"cannot connect to Ray at {address!r}: {e}") from None


def start_local_ray(*, num_cpus: int | None = None, object_store_memory: int = LOCAL_OBJECT_STORE_BYTES,
                    runtime_env: dict | None = None, log_to_driver: bool = True) -> None:
    """Start a fresh one-machine Ray in this process, reachable from this machine only.

    Every server listens on 127.0.0.1 (:func:`use_loopback_only`). The dashboard (127.0.0.1 too)
    serves Ray's state API: Train V2 needs it to free the placement group of a training whose
    driver was killed (a Tune trial stopped by ASHA); without it those CPUs stay reserved and later
    trials wait forever.
    """
    import ray

    use_loopback_only()
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=True, dashboard_host=LOCAL_DASHBOARD_HOST, log_to_driver=log_to_driver,
             runtime_env=runtime_env)


def _running_cluster() -> bool:
    """Is a Ray cluster started on this machine (`ray start --head`)?"""
    import tempfile
    from pathlib import Path

    return (Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster").exists()
