"""`pmvis compare`: runs of a temp sqlite MLflow store, best first, only differing params."""

from __future__ import annotations

import csv

import pytest

from pmvis.cli import main
from pmvis.core.errors import PmvisError
from pmvis.platform.compare import compare_runs, format_comparison
from pmvis.platform.experiments import mlflow_run

EXPERIMENT = "sweep-test"
# run name -> (params, metrics)
RUNS = {
    "trial-a": ({"filter": {"ria_tau": 0.6}, "fuse": {"mode": "select"}, "seed": 0}, {"AP": 30.0, "AP50": 50.0}),
    "trial-b": ({"filter": {"ria_tau": 0.7}, "fuse": {"mode": "vote"}, "seed": 0}, {"AP": 42.5, "AP50": 61.0}),
    "trial-c": ({"filter": {"ria_tau": 0.8}, "fuse": {"mode": "select"}, "seed": 0}, {"AP": 35.0, "AP50": 58.0}),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    import mlflow

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    for name, (params, metrics) in RUNS.items():
        with mlflow_run(EXPERIMENT, run_name=name, tracking_uri=uri, params=params):
            mlflow.log_metrics(metrics)
    return uri


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_compare_runs_best_first_with_differing_params_only(store):
    c = compare_runs(EXPERIMENT, metric="AP", tracking_uri=store)
    assert list(c.table["run_name"]) == ["trial-b", "trial-c", "trial-a"]
    assert list(c.table["metrics.AP"]) == [42.5, 35.0, 30.0]
    assert c.varying_params == ["filter.ria_tau", "fuse.mode"]
    assert c.constant_params == {"seed": "0"}
    assert c.other_metrics == ["AP50"]
    assert "params.seed" not in c.table.columns
    lowest = compare_runs(EXPERIMENT, metric="AP50", mode="min", tracking_uri=store)
    assert list(lowest.table["run_name"]) == ["trial-a", "trial-c", "trial-b"]
    text = format_comparison(c)
    assert text.index("trial-b") < text.index("trial-c") < text.index("trial-a")
    assert "1 params equal in every run (omitted)" in text


def test_cli_prints_and_writes_csv_and_png(store, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", store, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("trial-b") < printed.index("trial-c") < printed.index("trial-a")
    assert "seed" not in printed.splitlines()[1]  # header: the constant param is omitted
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_name"] for r in rows] == ["trial-b", "trial-c", "trial-a"]
    assert [r["params.filter.ria_tau"] for r in rows] == ["0.7", "0.8", "0.6"]
    assert "params.seed" not in rows[0] and "metrics.AP50" in rows[0]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.png"]  # no temp files left


def test_a_db_path_is_accepted_as_tracking_uri(store, tmp_path):
    c = compare_runs(EXPERIMENT, tracking_uri=store[len("sqlite:///"):])
    assert c.table["run_name"].iloc[0] == "trial-b"


def test_unknown_experiment_exits_2(store, tmp_path, capsys):
    assert main(["compare", "--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and EXPERIMENT in err
    assert not list(tmp_path.iterdir())


def test_metric_no_run_has_exits_2(store, tmp_path, capsys):
    assert main(["compare", "--experiment", EXPERIMENT, "--metric", "mAP", "--tracking-uri", store,
                 "--out", str(tmp_path)]) == 2
    assert "no run of experiment 'sweep-test' has metric 'mAP' (metrics logged: AP, AP50)" in capsys.readouterr().err


def test_missing_store_is_an_error_and_not_created(tmp_path):
    db = tmp_path / "absent" / "mlflow.db"
    with pytest.raises(PmvisError, match="no MLflow store"):
        compare_runs(EXPERIMENT, tracking_uri=f"sqlite:///{db}")
    assert not db.exists()


def test_metric_ap_finds_held_out_eval_ap(tmp_path):
    """Training and sweep runs log the held-out AP as eval_AP: the default --metric AP ranks them."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name, ap in (("t1", 1.5), ("t2", 4.0)):
        with mlflow_run("sw", run_name=name, tracking_uri=uri, params={"fuse.mode": name}):
            mlflow.log_metrics({"eval_AP": ap, "loss": 1.0})
    c = compare_runs("sw", tracking_uri=uri)
    assert c.metric == "eval_AP" and list(c.table["run_name"]) == ["t2", "t1"]
    with pytest.raises(PmvisError, match="has metric 'AP75'"):
        compare_runs("sw", metric="AP75", tracking_uri=uri)


def test_ensure_experiment_survives_a_concurrent_create(tmp_path, monkeypatch):
    """Two sweep trials start their trainings together: the one that loses the create race gets
    the experiment the other made instead of failing the trial."""
    import mlflow

    from pmvis.platform.experiments import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = ensure_experiment("raced", uri)
    real_get = mlflow.get_experiment_by_name
    calls = []

    def stale_get(name):  # the first lookup happened before the other process created it
        calls.append(name)
        return None if len(calls) == 1 else real_get(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", stale_get)
    assert ensure_experiment("raced", uri) == first
    assert len(calls) == 2
