"""The command line: every command has --help; the demo runs end to end on its embedded default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pmvis.cli import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "pmvis", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: pmvis " + command in out.stdout


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pmvis", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


DEMO_TEST_TRIALS = 2


@pytest.mark.slow
def test_demo_tiny(ray_session, tmp_path, capsys):
    """The whole demo on a tiny set: synth, baselines, box-only training, pseudo masks on Ray Data,
    fuse/filter, PM-VIS and fully supervised training, comparison, a sweep + compare, report,
    summary. Two sweep trials (the demo's default is 4): test_sweep covers ranking and ASHA."""
    import mlflow

    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--sweep-trials", str(DEMO_TEST_TRIALS)]) == 0
    text = capsys.readouterr().out
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
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow/mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pmvis-pseudo-masks"])
    assert len(runs) == 1 and "metrics.grabcut.mean_iou" in runs.columns
    train_runs = mlflow.search_runs(experiment_names=["pmvis-demo-train"])
    assert len(train_runs) == 3
    # The closing sweep: the trials of the demo space, one MLflow run each (knobs as params, eval_AP),
    # compared (CSV + PNG), the best config written, and everything named in the summary.
    sweep_runs = mlflow.search_runs(experiment_names=["pmvis-demo-sweep"])
    assert len(sweep_runs) == DEMO_TEST_TRIALS and "metrics.eval_AP" in sweep_runs.columns
    assert {"params.fuse.mode", "params.filter.ria_tau", "params.loss.tk_k"} <= set(sweep_runs.columns)
    trainer_runs = mlflow.search_runs(experiment_names=["pmvis-demo-sweep-train"])
    assert len(trainer_runs) == DEMO_TEST_TRIALS and set(trainer_runs["status"]) <= {"FINISHED", "KILLED"}  # none left RUNNING
    results = json.loads((out / "sweeps/pmvis-demo-sweep/results.json").read_text())
    assert len(results["trials"]) == DEMO_TEST_TRIALS and results["space"].endswith("demo.yaml")
    assert all(t["status"] == "done" for t in results["trials"]), results["trials"]  # errors name their traceback
    assert set(sweep_runs["status"]) == {"FINISHED"}
    assert (out / "sweeps/pmvis-demo-sweep/best_config.yaml").is_file()
    with open(out / "compare/compare.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + DEMO_TEST_TRIALS  # header + one line per run
    assert (out / "compare/compare.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    for needle in ("| PM-VIS (pseudo masks) |", "eval_AP", "compare.png", "quality_by_source.png",
                   "mlflow ui --backend-store-uri sqlite:///", "best config:"):
        assert needle in summary and needle in text, needle


def test_demo_summary_names_a_failed_trial_and_its_traceback(tmp_path):
    """A sweep trial that failed for good is listed under the trial table with its error and the
    file holding its whole traceback (the table alone would only say "error")."""
    from pmvis.jobs.demo import _summary
    from pmvis.platform.sweep import SweepResult, TrialRow

    rows = [TrialRow("t_00000", "done", {"fuse.mode": "vote"}, 1.5, 4, str(tmp_path / "a")),
            TrialRow("t_00001", "error", {"fuse.mode": "select"}, None, None, None,
                     error="RuntimeError: worker died", error_file=str(tmp_path / "t1" / "error.txt"))]
    sweep = SweepResult(name="sw", sweep_dir=str(tmp_path), restored=False, max_concurrent=2, rows=rows,
                        best=rows[0], best_config_path=str(tmp_path / "best_config.yaml"), best_trial_path=None,
                        results_path=str(tmp_path / "results.json"), tracking_uri="sqlite:///x.db", experiment="sw")
    text = _summary(tmp_path, "| table |", sweep, None, {"plots": []}, "sqlite:///x.db", 60.0)
    assert "| t_00001 | select | - | - | error |" in text
    assert f"trial t_00001 failed: RuntimeError: worker died (traceback: {tmp_path / 't1' / 'error.txt'})" in text
    assert "trial t_00000 failed" not in text


def test_side_by_side_training_reraises_a_clear_error_as_itself(ray_session, tmp_path):
    """The demo's concurrent trainings run in Ray tasks: bad input still surfaces as PmvisError
    naming the problem (exit 2 with a message), not as Ray's wrapped task traceback."""
    from pmvis.jobs.demo import train_side_by_side
    from pmvis.platform.errors import PmvisError
    from pmvis.platform.training import TrainConfig

    missing = tmp_path / "no-such-data"
    cfg = TrainConfig.tiny(missing, iterations=2, run_name="bad", storage_path=str(tmp_path / "runs"),
                           tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(PmvisError) as err:
        train_side_by_side([cfg])
    assert not isinstance(err.value, ray_session.exceptions.RayTaskError)  # Ray subclasses the cause
    assert str(missing) in str(err.value) and "Traceback" not in str(err.value)


def test_demo_missing_data_threshold_follows_the_tracker_engine():
    """The flow engine's confidences are not SAM 2's object scores: Missing-Data takes what it reports."""
    from pmvis.jobs.demo import TRACK_OPTIONS, filter_config
    from pmvis.models.sources.track import TrackConfig

    assert filter_config(dict(TRACK_OPTIONS)).missing_min_confidence == TrackConfig().flow_present_threshold
    assert filter_config({"engine": "sam2"}).missing_min_confidence == 0.8
