"""`pmvis sweep`: Ray Tune over fuse/filter/loss knobs, re-fusing from a cached raw store."""

from __future__ import annotations

from pathlib import Path

import pytest
from raw_store_for_tests import make_store

from pmvis.core.errors import PmvisError


def space_file(tmp_path, text="fuse.mode: {choice: [select, vote]}\nloss.pseudo_dice_weight: {uniform: [1.0, 5.0]}\n",
               name="space.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def sweep_config(tmp_path, data, raw, **kw):
    from pmvis.platform.tune.config import SweepConfig

    values = dict(space=str(space_file(tmp_path)), data_dir=str(data), pseudo_masks=str(raw), name="sw",
                  storage_path=str(tmp_path / "sweeps"), samples=2, search="random", scheduler="fifo",
                  iterations=4, preset="tiny", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                  train_overrides={"checkpoint_every": 2, "log_every": 2, "batch_size": 1,
                                   "data": {"val_fraction": 0.34}})
    values.update(kw)
    return SweepConfig(**values)


def test_trial_configs_apply_knobs(tmp_path):
    from pmvis.platform.tune.trials import base_train_values, trial_configs

    data, raw = make_store(tmp_path)
    cfg = sweep_config(tmp_path, data, raw)
    train = base_train_values(cfg)
    assert train["eval_every"] == 2 and train["loss"]["mode"] == "pmvis" and train["iterations"] == 4
    ctx = {"name": "sw", "train_values": train, "fuse_overrides": {"doob_margin": 2}, "filter_overrides": {},
           "filter_on": True}
    fuse, filt, tv = trial_configs({"fuse.mode": "vote", "fuse.source_weights.hqsam": 0.5,
                                    "filter.ria_tau": 0.65, "loss.pseudo_dice_weight": 3.0}, ctx)
    assert fuse.mode == "vote" and fuse.doob_margin == 2 and fuse.source_weights["hqsam"] == 0.5
    assert fuse.source_weights["grabcut"] == 0.5  # the other weights kept
    assert filt.ria_tau == 0.65 and filt.fuse.mode == "vote"  # the filter's fusion follows the trial's
    assert tv["loss"]["pseudo_dice_weight"] == 3.0 and tv["loss"]["mode"] == "pmvis"


def test_bad_inputs(tmp_path):
    from pmvis.platform.tune.search_spaces import load_space
    from pmvis.platform.tune.sweep import build_search_alg, run_sweep
    from pmvis.platform.tune.trials import base_train_values

    grid = load_space(space_file(tmp_path, "fuse.mode: {grid: [select, vote]}\n", "grid.yaml"))
    with pytest.raises(PmvisError, match="optuna cannot search grid knobs"):
        build_search_alg(grid, "optuna", None, 1)
    with pytest.raises(PmvisError, match="unknown search"):
        build_search_alg(grid, "bayes", None, 1)
    data, raw = make_store(tmp_path)
    with pytest.raises(PmvisError, match="held-out"):
        base_train_values(sweep_config(tmp_path, data, raw, train_overrides={"data": {"val_fraction": 0.0}}))
    with pytest.raises(PmvisError, match="unknown knob"):
        run_sweep(sweep_config(tmp_path, data, raw, space=str(space_file(tmp_path, "fuse.nope: 1\n", "bad.yaml"))))


def test_search_algorithms_draw_valid_seeded_configs(tmp_path):
    """random draws repeat under a seed; optuna (TPE, in the lock) suggests from the whole shipped
    space and learns from a completed trial; both cap the trials running at once."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from pmvis.platform.tune.search_spaces import load_space
    from pmvis.platform.tune.sweep import build_search_alg, param_space

    tune.register_trainable("pmvis_test_noop", lambda config: None)
    space = load_space("pmvis")
    draws = []
    for _ in range(2):
        alg = build_search_alg(space, "random", 7, 2)
        alg.add_configurations({"trainable": {"run": "pmvis_test_noop", "config": param_space(space, "random"),
                                              "num_samples": 3}})
        draws.append([alg.next_trial().config for _ in range(2)])
        assert alg.next_trial() is None  # a third trial waits: 2 run at once
    assert draws[0] == draws[1] and draws[0][0] != draws[0][1]
    optuna = build_search_alg(space, "optuna", 0, 2)
    assert isinstance(optuna, ConcurrencyLimiter) and optuna.max_concurrent == 2
    assert optuna.set_search_properties("eval_AP", "max", param_space(space, "optuna"))
    searched = {p for p, k in space.knobs.items() if k.kind != "value"}  # Tune merges the fixed ones
    first = optuna.suggest("t1")
    assert set(first) == searched
    fixed = {p: k.args for p, k in space.knobs.items() if k.kind == "value"}
    space.validate({**fixed, **first})  # builds FuseConfig / FilterConfig / LossConfig from the draw
    for draw in draws[0]:
        space.validate({p: draw[p] for p in space.knobs})  # the Tune config is flat
    optuna.on_trial_complete("t1", {"eval_AP": 3.0, "training_iteration": 1})
    assert set(optuna.suggest("t2")) == searched


def _runs(tmp_path, experiment):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment])


# A whole two-trial `pmvis sweep` from the command line (ranked table, one MLflow run per trial
# with its knobs as params, results.json, best_config.yaml passing train's checks) runs as a
# submitted Ray job: tests/test_cluster.py::test_job_submission_runs_the_demo_on_a_local_head.


@pytest.mark.slow
def test_sweep_resumes_an_interrupted_trial(tmp_path, ray_session):
    """Interruption, on an optuna search: the trial's training raises at iteration 2 once (debug
    fault injection, no Train retries), so the first run ends with an errored trial; the same name
    again restores the sweep (resume_errored) and the trial's training resumes from its checkpoint
    at iteration 2."""
    from pmvis.platform.tune.sweep import run_sweep

    data, raw = make_store(tmp_path)
    marker = tmp_path / "failed-once"
    overrides = {"checkpoint_every": 2, "log_every": 2, "batch_size": 1, "max_failures": 0,
                 "debug": {"fail_at_iteration": 3, "fail_mode": "raise", "fail_marker": str(marker)}}
    # optuna (TPE): its searcher state is restored with the sweep too.
    cfg = sweep_config(tmp_path, data, raw, samples=1, scheduler="asha", search="optuna", seed=0,
                       train_overrides=overrides, trial_retries=0,
                       space=str(space_file(tmp_path, "fuse.mode: {choice: [select, vote]}\n", "one.yaml")))
    first = run_sweep(cfg)
    assert not first.restored and marker.exists()
    assert [r.status for r in first.rows] == ["error"] and first.best is None
    # The failure is reported with its cause and where the whole traceback is.
    assert first.rows[0].error and first.rows[0].error_file
    assert "injected failure at iteration 3" in Path(first.rows[0].error_file).read_text()
    trial_id = first.rows[0].trial_id

    second = run_sweep(cfg)
    assert second.restored
    assert [r.trial_id for r in second.rows] == [trial_id] and second.rows[0].status == "done"
    assert second.rows[0].ap is not None and second.rows[0].iteration == 4
    assert second.best_config_path is not None
    # The training resumed from its checkpoint (same Train run), not from scratch.
    from pmvis.platform.train.checkpoints import latest_checkpoint, read_checkpoint_meta

    run_dir = tmp_path / "sweeps" / "sw" / "pmvis_trials" / trial_id / "train"
    assert read_checkpoint_meta(latest_checkpoint(run_dir))["iteration"] == 4
    runs = _runs(tmp_path, "sw-train")
    assert len(runs) == 1 and runs.iloc[0]["tags.pmvis.resumed_at"] == "2"  # the trainer's run continues
    # The resumed trial logs into its first MLflow run of the sweep's experiment (one run per trial),
    # which ends FINISHED with the knobs as params and the final eval_AP.
    sweep_runs = _runs(tmp_path, "sw")
    assert list(sweep_runs["status"]) == ["FINISHED"], sweep_runs[["run_id", "status"]]
    assert sweep_runs.iloc[0]["params.fuse.mode"] in ("select", "vote")
    assert sweep_runs.iloc[0]["metrics.eval_AP"] == pytest.approx(second.rows[0].ap)


@pytest.mark.slow
def test_a_failed_trial_is_retried_and_resumes_its_training(tmp_path, ray_session):
    """A trial whose training fails once (Train retries off) is rerun by Tune (trial_retries=1):
    the rerun resumes the training from its checkpoint, the trial ends done, and its MLflow runs
    (the sweep's and the trainer's) are one each, both FINISHED."""
    from pmvis.platform.tune.sweep import run_sweep

    data, raw = make_store(tmp_path)
    marker = tmp_path / "failed-once"
    overrides = {"checkpoint_every": 2, "log_every": 2, "batch_size": 1, "max_failures": 0,
                 "debug": {"fail_at_iteration": 3, "fail_mode": "raise", "fail_marker": str(marker)}}
    cfg = sweep_config(tmp_path, data, raw, samples=1, seed=0, train_overrides=overrides, trial_retries=1,
                       space=str(space_file(tmp_path, "fuse.mode: {choice: [select, vote]}\n", "one.yaml")))
    result = run_sweep(cfg)
    assert marker.exists()  # the failure did happen
    assert [r.status for r in result.rows] == ["done"] and result.rows[0].iteration == 4, result.rows
    assert result.rows[0].error is None and result.best is not None
    trainer_runs = _runs(tmp_path, "sw-train")
    assert list(trainer_runs["status"]) == ["FINISHED"] and trainer_runs.iloc[0]["tags.pmvis.resumed_at"] == "2"
    sweep_runs = _runs(tmp_path, "sw")
    assert list(sweep_runs["status"]) == ["FINISHED"], sweep_runs[["run_id", "status"]]


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started before the input was checked")


@pytest.mark.parametrize("args, message", [
    (["--space", "{bad}"], "unknown knob"),
    (["--data", "{tmp}/nope"], "dataset directory not found"),
    (["--pseudo-masks", "{tmp}/nope"], "no raw pseudo-mask store"),
    (["--set", "nope=1"], "nope"),
])
def test_bad_input_fails_before_ray_starts(tmp_path, monkeypatch, capsys, args, message):
    """Issue 14, item 3: every check runs before connect() (a Ray start costs ~20 s)."""
    import pmvis.platform.cluster as cluster
    from pmvis import cli

    monkeypatch.setattr(cluster, "connect", _no_ray)
    data, raw = make_store(tmp_path)
    bad = space_file(tmp_path, "fuse.nope: {choice: [1, 2]}\n", "bad.yaml")
    flags = {"--space": str(space_file(tmp_path)), "--data": str(data), "--pseudo-masks": str(raw)}
    extra = [a.format(bad=bad, tmp=tmp_path) for a in args]
    if extra[0] in flags:
        flags[extra[0]] = extra[1]
        extra = []
    argv = ["sweep", *[x for kv in flags.items() for x in kv], *extra, "--storage", str(tmp_path / "s"),
            "--preset", "tiny", "--set", "data.val_fraction=0.34"]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_sweep_command_line_builds_its_config_and_prints_the_ranked_result(tmp_path, monkeypatch, capsys):
    """`pmvis sweep`'s flags reach SweepConfig (the sweep itself runs end to end in the demo job,
    tests/test_cluster.py, and in the tests above); the result prints as the ranked table with the
    best config. run_sweep is replaced here, so no Ray starts."""
    import pmvis.platform.cluster as cluster
    import pmvis.platform.tune.sweep as sweep
    from pmvis import cli
    from pmvis.platform.tune.results import SweepResult, TrialRow

    seen = {}

    def fake_run_sweep(cfg, plan=None):
        seen["cfg"], seen["plan"] = cfg, plan
        rows = [TrialRow("t_00000", "done", {"fuse.mode": "vote"}, 0.25, 4, str(tmp_path / "a")),
                TrialRow("t_00001", "done", {"fuse.mode": "select"}, 0.5, 4, str(tmp_path / "b"))]
        return SweepResult(name=cfg.name, sweep_dir=str(tmp_path), restored=False, max_concurrent=1, rows=rows,
                           best=rows[1], best_config_path=str(tmp_path / "best_config.yaml"),
                           best_trial_path=str(tmp_path / "best_trial.yaml"),
                           results_path=str(tmp_path / "results.json"), tracking_uri=cfg.tracking_uri,
                           experiment=cfg.name)

    monkeypatch.setattr(cluster, "connect", lambda address="auto": seen.setdefault("address", address))
    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    data, raw = make_store(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["sweep", "--space", str(space_file(tmp_path)), "--data", str(data), "--pseudo-masks", str(raw),
            "--samples", "2", "--seed", "7", "--name", "cli-sweep", "--storage", str(tmp_path / "s"),
            "--tracking-uri", uri, "--iterations", "4", "--preset", "tiny", "--search", "optuna",
            "--scheduler", "fifo", "--trial-retries", "0", "--max-concurrent", "1",
            "--set", "checkpoint_every=2", "--set", "fuse.mode=vote", "--set", "data.val_fraction=0.34"]
    assert cli.main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.samples, cfg.seed, cfg.name, cfg.iterations, cfg.preset) == (2, 7, "cli-sweep", 4, "tiny")
    assert (cfg.search, cfg.scheduler, cfg.trial_retries, cfg.max_concurrent) == ("optuna", "fifo", 0, 1)
    assert cfg.storage_path == str(tmp_path / "s") and cfg.tracking_uri == uri and seen["address"] == "auto"
    assert cfg.train_overrides["checkpoint_every"] == 2 and cfg.fuse_overrides == {"mode": "vote"}
    assert seen["plan"] is not None  # checked before Ray (prepare_sweep), then handed on
    text = capsys.readouterr().out
    assert "pmvis sweep cli-sweep: 2 trials" in text and "eval_AP" in text and "fuse.mode" in text
    assert f"best config: {tmp_path / 'best_config.yaml'}" in text and "t_00001" in text


def test_trials_stopped_early_are_marked_and_rank_after_the_full_budget_ones():
    """An ASHA-stopped trial's AP is from fewer iterations: it is ``stopped``, ranks after every
    trial that trained the whole budget (even with a higher AP), and a failed one ranks last."""
    from types import SimpleNamespace

    from pmvis.platform.tune.results import collect_rows, format_trials

    def result(tid, ap, it, error=None):
        return SimpleNamespace(metrics={"trial_id": tid, "eval_AP": ap, "iteration": it}, config={"fuse.mode": "vote"},
                               error=error, path=None)

    rows = collect_rows([result("a", 0.20, 4), result("b", 0.35, 2), result("c", 0.25, 4),
                         result("d", 0.50, 2, error=RuntimeError("boom"))], ["fuse.mode"], iterations=4)
    assert [(r.trial_id, r.status) for r in rows] == [("c", "done"), ("a", "done"), ("b", "stopped"), ("d", "error")]
    assert "stopped" in format_trials(rows).splitlines()[3]
