"""cluster.yaml against Ray's own cluster-config validator, and a Ray job submitted to a local head.

The job test starts its own Ray head in a subprocess (own temp dir, own ports, its own token) and
never calls ``ray.init`` here, so it does not touch the session's ``ray_session``. It stops only
the head it started (SIGTERM to that process, then its process group), never ``ray stop``, which
would kill every Ray process on the machine.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pmvis.core.errors import PmvisError

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
WORLD = ("0.0.0.0/0", "::/0")


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif node is not None:
        yield str(node)


def test_cluster_yaml_passes_rays_validator(cluster_config):
    """What `ray up` runs before touching the cloud: merge with the provider defaults, then the
    JSON schema and consistency checks (no cloud credentials needed)."""
    from ray.autoscaler._private.util import validate_config

    prepared = _prepared(cluster_config)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]


def test_rays_validator_rejects_a_broken_copy(cluster_config):
    """The validator really checks this file's shape (so the test above is not vacuous)."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(cluster_config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(_prepared(bad))
    bad = copy.deepcopy(cluster_config)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(_prepared(bad))


def test_no_port_open_to_the_world(cluster_config):
    # No rule anywhere in the file names the whole internet.
    for s in _strings(cluster_config):
        assert not any(w in s for w in WORLD), f"cluster.yaml opens something to the world: {s!r}"
    provider = cluster_config["provider"]
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
            [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not set(ranges) & set(WORLD)
    # Every node type names its own security group: Ray then creates none (a group Ray creates
    # always gets SSH from 0.0.0.0/0), and no node gets a public IP.
    for name, node_type in cluster_config["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name} has no SecurityGroupIds"
        assert node_type["node_config"].get("SubnetIds"), f"{name} has no (private) SubnetIds"
    assert provider["use_internal_ips"] is True
    # The dashboard (job API) listens on localhost only; reach it through an SSH tunnel.
    head = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    # MLflow has no authentication: it binds the head's private address, never every interface.
    mlflow_cmd = next(c for c in cluster_config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host $(hostname -I | awk '{print $1}')" in mlflow_cmd and "0.0.0.0" not in mlflow_cmd
    assert not any("127.0.0.1:5000" in c for c in cluster_config["head_setup_commands"])


def test_cluster_runs_mlflow_on_the_head_and_pmvis_from_uv(cluster_config):
    c = cluster_config
    head_start = " ".join(c["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--backend-store-uri sqlite:///" in head_start
    assert "--default-artifact-root" in head_start and "--port 5000" in head_start
    assert "ray start --head" in head_start and "RAY_AUTH_MODE=token" in head_start
    worker_start = " ".join(c["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_start
    assert "RAY_AUTH_MODE=token" in worker_start and "--address=$RAY_HEAD_IP:6379" in worker_start
    assert any("uv sync --locked" in cmd for cmd in c["setup_commands"])
    assert "." in c["file_mounts"].values()  # the repo is synced
    assert any(".venv" in e for e in c["rsync_exclude"])
    head_type = c["available_node_types"][c["head_node_type"]]
    assert head_type["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in c["available_node_types"].items() if n != c["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 and t["resources"]["GPU"] >= 1 for t in gpu)
    assert sum(t["max_workers"] for t in gpu) <= c["max_workers"]


# ----------------------------------------------------------------------------- job submission


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` we started (it shuts its node down), then SIGKILL what is
    left of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


# The job is what a user submits to a cluster (README "Running on a cluster"): here README command 1,
# `pmvis demo --tiny` — synthetic data, a box-only training, pseudo masks on Ray Data, fuse/filter,
# PM-VIS and fully supervised trainings, a 2-trial Tune sweep (each trial re-fuses the cached
# pseudo masks and trains in a TorchTrainer), `pmvis compare` of its MLflow runs, the report —
# joining the cluster the job was submitted to (RAY_ADDRESS is set for a job driver), from the
# uploaded working_dir. One run checks the job plumbing and the whole demo chain: CI pays for one
# demo and one sweep, not two of each. The demo's default is 4 trials; test_sweep covers ranking
# and ASHA, and test_sweep's CLI test the `pmvis sweep` flags.
DEMO_SWEEP = "pmvis-demo-sweep"
DEMO_TEST_TRIALS = 2
JOB_DEADLINE_S = 900  # the tiny demo takes ~6 min on 2 quiet cores
JOB_WORKER_PORTS = (20000, 29999)  # below Linux's ephemeral range (32768+), above Ray's default


def _trial_failures(out: Path, logs: str) -> str:
    """What went wrong in the job's sweep trials: the log's "trial ... failed" lines and every
    error file Tune wrote, so a failing run explains itself."""
    lines = [ln for ln in logs.splitlines() if " failed: " in ln]
    for err in sorted(out.glob("sweeps/*/*/error.txt")):
        lines.append(f"--- {err}:\n{err.read_text()[-4000:]}")
    return "\n".join(lines)


def _job_entrypoint(out: Path) -> str:
    py = shlex.quote(sys.executable)
    demo = f"{py} -m pmvis demo --tiny --out {shlex.quote(str(out))} --sweep-trials {DEMO_TEST_TRIALS}"
    return " && ".join([
        f"{py} -c " + shlex.quote("import pmvis; print('PMVIS_FROM', pmvis.__file__)"), demo])


def _check_demo_outputs(out: Path, text: str) -> None:
    """The demo's files and printed tables: baselines, pseudo-mask report, the three-way comparison
    (markdown + JSON), every training in MLflow, and the summary naming them."""
    assert "box_baseline" in text and "AP50" in text and "mean IoU" in text
    box = json.loads((out / "metrics_box_baseline.json").read_text())
    ann = json.loads((out / "metrics_annotation_masks.json").read_text())
    assert ann["AP"] > box["AP"]  # the noisy annotation masks are closer to the truth than boxes
    report = json.loads((out / "report/report.json").read_text())
    # without checkpoints: the weight-free sources and the box-only model, no random-weight HQ-SAM
    assert set(report["quality"]) == {"grabcut", "track", "boxinst", "fused", "filled box"}
    assert "HQ-SAM and SAM 2 are skipped: no checkpoints given" in text
    table = (out / "comparison.md").read_text()
    for label in ("box-only", "PM-VIS", "fully supervised"):
        assert label in table
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison) == {"box-only", "pmvis", "full"}
    assert all(0 <= comparison[k]["AP"] <= 100 and "AP50" in comparison[k] for k in comparison)
    assert (out / "report/quality_by_source.png").stat().st_size > 0
    assert (out / "train_pseudo.json").exists() and (out / "train_clean.json").exists()
    summary = (out / "summary.md").read_text()
    for needle in ("| PM-VIS (pseudo masks) |", "eval_AP", "compare.png", "quality_by_source.png",
                   "mlflow ui --backend-store-uri sqlite:///", "best config:"):
        assert needle in summary and needle in text, needle


def _check_demo_mlflow(tracking_uri: str, failures: str) -> None:
    """Every run closed (FINISHED, or KILLED for a sweep trial's training ASHA stopped early); the
    pseudo-mask run with per-source quality; three demo trainings; one sweep run per trial with its
    knobs as params (not metrics) and a held-out AP that is a number."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert {"pmvis-pseudo-masks", "pmvis-demo-train", DEMO_SWEEP, f"{DEMO_SWEEP}-train"} <= set(experiments)
    for name, exp_id in experiments.items():
        allowed = {"FINISHED", "KILLED"} if name == f"{DEMO_SWEEP}-train" else {"FINISHED"}
        statuses = [r.info.status for r in client.search_runs([exp_id])]
        assert set(statuses) <= allowed, (name, statuses, failures)
    pseudo_runs = client.search_runs([experiments["pmvis-pseudo-masks"]])
    assert len(pseudo_runs) == 1 and "grabcut.mean_iou" in pseudo_runs[0].data.metrics
    assert len(client.search_runs([experiments["pmvis-demo-train"]])) == 3
    sweep_runs = client.search_runs([experiments[DEMO_SWEEP]])
    assert len(sweep_runs) == DEMO_TEST_TRIALS, failures
    for run in sweep_runs:
        params = run.data.params
        assert params["fuse.mode"] in ("select", "vote") and 0.1 <= float(params["fuse.source_weights.grabcut"]) < 4
        assert params["loss.tk"] in ("True", "False") and params["loss.pseudo_quality_weighting"] in ("True", "False")
        assert run.data.metrics["eval_AP"] == run.data.metrics["eval_AP"]  # logged, not NaN
        assert not [m for m in run.data.metrics if m.startswith("config")]  # knobs are params, not metrics
    assert len(client.search_runs([experiments[f"{DEMO_SWEEP}-train"]])) == DEMO_TEST_TRIALS


def _check_sweep_outputs(sweep_dir: Path) -> None:
    """A finished sweep's files: every trial done, and the best trial's config is a `pmvis train`
    config (its trial's pseudo file, its knobs) that passes train's checks before Ray."""
    from pmvis.core.config import load_config
    from pmvis.platform.train.config import TrainConfig
    from pmvis.platform.train.driver import preflight

    results = json.loads((sweep_dir / "results.json").read_text())
    assert len(results["trials"]) == DEMO_TEST_TRIALS and results["space"].endswith("demo.yaml")
    assert all(t["status"] == "done" for t in results["trials"]), results["trials"]
    best = yaml.safe_load((sweep_dir / "best_trial.yaml").read_text())
    cfg = load_config(TrainConfig, sweep_dir / "best_config.yaml")
    assert cfg.data.pseudo_annotations == str(sweep_dir / "pmvis_trials" / best["trial_id"] / "pseudo.json")
    assert cfg.loss.mode == "pmvis" and cfg.loss.tk == best["knobs"]["loss.tk"]
    assert cfg.loss.pseudo_quality_weighting == best["knobs"]["loss.pseudo_quality_weighting"]
    assert best["fuse_config"]["mode"] == best["knobs"]["fuse.mode"]
    checked, resume = preflight(cfg)
    assert resume is None and checked.run_name  # a fresh run, not the trial's own


def test_ray_workers_run_in_the_installed_environment(ray_session):
    """Not through Ray's `uv run` hook (on when the driver runs under `uv run`, as `.ci/run` does):
    that hook builds a venv inside each uploaded working dir and starts every worker through uv."""
    interpreter = ray_session.remote(lambda: sys.executable)
    assert ray_session.get(interpreter.remote()) == sys.executable


def test_pmvis_turns_the_uv_run_hook_off_unless_the_user_set_it(monkeypatch):
    from pmvis.platform.cluster import UV_RUN_HOOK_ENV, use_installed_environment

    monkeypatch.delenv(UV_RUN_HOOK_ENV, raising=False)
    use_installed_environment()
    assert os.environ[UV_RUN_HOOK_ENV] == "0"
    monkeypatch.setenv(UV_RUN_HOOK_ENV, "1")
    use_installed_environment()
    assert os.environ[UV_RUN_HOOK_ENV] == "1"


def test_pmvis_turns_token_auth_on_and_local_metrics_off_unless_the_user_set_them(monkeypatch):
    from pmvis.platform.cluster import RAY_AUTH_MODE_ENV, RAY_METRICS_ENV, use_installed_environment

    monkeypatch.delenv(RAY_AUTH_MODE_ENV, raising=False)
    monkeypatch.delenv(RAY_METRICS_ENV, raising=False)
    use_installed_environment()
    assert os.environ[RAY_AUTH_MODE_ENV] == "token" and os.environ[RAY_METRICS_ENV] == "0"
    monkeypatch.setenv(RAY_METRICS_ENV, "1")
    use_installed_environment()
    assert os.environ[RAY_METRICS_ENV] == "1"


def test_the_test_sessions_ray_requires_the_token_and_has_no_metrics_agent_endpoint(ray_session):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN
    # With metrics collection on, the metrics agent would serve Prometheus on 0.0.0.0.
    port = ray_session.nodes()[0]["MetricsExportPort"]
    assert port <= 0 or port not in _listening_sockets()


def test_a_local_ray_listens_on_loopback_only(ray_session):
    """The session's Ray is started as pmvis starts a local one (start_local_ray).

    Without it, Ray on Linux gives the node the machine's address: its gRPC servers listen on every
    interface, and so do the unauthenticated Prometheus endpoints of the dashboard and autoscaler.
    """
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    node = ray_session.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    gcs_port = int(ray_session.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    ports = {"gcs": gcs_port, "raylet": node["NodeManagerPort"], "object manager": node["ObjectManagerPort"],
             "dashboard metrics": DASHBOARD_METRIC_PORT, "autoscaler metrics": AUTOSCALER_METRIC_PORT}
    listening = _listening_sockets()
    assert gcs_port in listening and node["NodeManagerPort"] in listening
    for name, port in ports.items():
        exposed = {a for a in listening.get(port, set()) if not ipaddress.ip_address(a).is_loopback}
        assert not exposed, f"Ray's {name} port {port} listens on {exposed}"


def _listening_sockets() -> dict[int, set[str]]:
    """Port → addresses in LISTEN state on this machine (Linux /proc/net; state 0A; no psutil).

    An IPv4-mapped IPv6 address is given as its IPv4 address; the wildcard as 0.0.0.0 or ::.
    """
    sockets: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":
                continue
            hex_address, hex_port = fields[1].rsplit(":", 1)
            # /proc/net prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            sockets.setdefault(int(hex_port, 16), set()).add(str(address))
    return sockets


def test_no_local_ray_without_token_auth_unless_asked(monkeypatch, ray_session):
    from pmvis.platform.cluster import ALLOW_NO_AUTH_ENV, RAY_AUTH_MODE_ENV, connect

    monkeypatch.setenv(RAY_AUTH_MODE_ENV, "disabled")
    monkeypatch.delenv(ALLOW_NO_AUTH_ENV, raising=False)
    # Refused before Ray is touched (here a Ray is already up: connect() would otherwise reuse it).
    with pytest.raises(PmvisError, match=rf"RAY_AUTH_MODE=disabled.*{ALLOW_NO_AUTH_ENV}=1"):
        connect("local")
    monkeypatch.setenv(ALLOW_NO_AUTH_ENV, "1")
    connect("local")  # asked for explicitly: the running Ray is reused


@pytest.mark.slow
@pytest.mark.timeout(JOB_DEADLINE_S + 300)
def test_job_submission_runs_the_demo_on_a_local_head(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_exe = Path(sys.executable).with_name("ray")
    if not ray_exe.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    # Short temp dir: Ray's unix sockets live under it (path length limit ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="pmray", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    # (PYTEST_CURRENT_TEST switches on MLflow's own test-time checks: the job runs as a user's would.
    # The head keeps conftest's RAY_ENABLE_UV_RUN_RUNTIME_ENV=0: it descends from `uv run pytest` in
    # CI, and its own Ray clients would otherwise start job processes through `uv run`; a cluster's
    # head, started by cluster.yaml from the installed venv, does not.)
    # Token auth on explicitly, with this test's own token (not ~/.ray/auth_token): the head and
    # every process it starts (the job driver included) read it from RAY_AUTH_TOKEN_PATH.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    (gcs, dash, client_port, agent_listen, agent_grpc, metrics, runtime_env, node_mgr,
     obj_mgr) = _free_ports(9)
    log_path = tmp_path / "ray_head.log"
    cmd = [str(ray_exe), "start", "--head", "--block", "--disable-usage-stats",
           "--temp-dir", str(temp_dir), "--num-cpus", "2", "--object-store-memory", str(300 * 1024**2),
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_listen),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr),
           # Workers listen on ports of their own range: the tests' session Ray (same machine) hands
           # out Ray's default range (10002-19999), and a port both raylets give out breaks a worker.
           "--min-worker-port", str(JOB_WORKER_PORTS[0]), "--max-worker-port", str(JOB_WORKER_PORTS[1])]
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "job"
    headers = {"Authorization": f"Bearer {token}"}
    job_id = None
    client = None
    with open(log_path, "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                client = JobSubmissionClient(address, headers=headers)
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard at {address} did not come up:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)

        # Token auth is in force: the job API refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
        assert refused.value.code in (401, 403)

        job = dict(
            entrypoint=_job_entrypoint(out),
            runtime_env={
                "working_dir": str(REPO),
                "excludes": [".venv", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info",
                             "pmvis-demo", "pmvis-compare", "mlflow", "benchmarks/out"],
            },
        )
        while job_id is None:
            try:
                job_id = client.submit_job(**job)
            except RuntimeError as e:
                # The dashboard answers before its agent is up on a loaded machine (HTTP 500 "No
                # available agent to submit job, please try again later").
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        deadline = time.monotonic() + JOB_DEADLINE_S
        status = client.get_job_status(job_id)
        while not status.is_terminal():
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {status} after {JOB_DEADLINE_S} s:\n{client.get_job_logs(job_id)[-4000:]}")
            time.sleep(5)
            status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, f"job {job_id} {status}:\n{logs[-6000:]}"

        # The job ran the uploaded copy of the repo and wrote every output.
        where = [ln.split(" ", 1)[1] for ln in logs.splitlines() if ln.startswith("PMVIS_FROM ")]
        assert where and not Path(where[0]).is_relative_to(REPO), where  # the uploaded copy, not REPO
        print(f"job {job_id} {status}; last lines of its log:\n" + "\n".join(logs.splitlines()[-25:]))
        _check_demo_outputs(out, logs)
        sweep_dir = out / "sweeps" / DEMO_SWEEP
        assert f"pmvis sweep {DEMO_SWEEP}: {DEMO_TEST_TRIALS} trials" in logs and "fuse.mode" in logs  # ranked
        _check_sweep_outputs(sweep_dir)
        with open(out / "compare/compare.csv") as f:
            assert len(f.read().strip().splitlines()) == 1 + DEMO_TEST_TRIALS  # header + one line per run
        assert (out / "compare/compare.png").stat().st_size > 0
        # The job's driver used the head it was submitted to, not a Ray of its own.
        assert "Started a local Ray instance" not in logs, logs[-3000:]
        # Workers ran in the installed environment, not through `uv run` in the uploaded copy (with
        # Ray's uv-run hook on, the job's trial workers were started through `uv run`).
        for uv_sign in ("Creating virtual environment", "does not match the project environment path"):
            assert uv_sign not in logs, logs[-3000:]
        # A trial that failed and was rerun (trial_retries) is fine; say so, and explain a final failure.
        failures = _trial_failures(out, logs)
        if failures:
            print(f"sweep trial failures (retried or final):\n{failures}")
        _check_demo_mlflow(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}", failures)
    finally:
        if client is not None and job_id is not None:
            try:
                if not client.get_job_status(job_id).is_terminal():
                    client.stop_job(job_id)
            except Exception:
                pass
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
