"""The command line: every command has --help; the demo runs end to end on its embedded default."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pmvis.cli import COMMANDS


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


# The whole demo (`pmvis demo --tiny`: synth, baselines, box-only training, pseudo masks on Ray
# Data, fuse/filter, PM-VIS and fully supervised training, comparison, a sweep + compare, report,
# summary) runs as a submitted Ray job, with every check of its outputs:
# tests/test_cluster.py::test_job_submission_runs_the_demo_on_a_local_head.


def test_demo_summary_names_a_failed_trial_and_its_traceback(tmp_path):
    """A sweep trial that failed for good is listed under the trial table with its error and the
    file holding its whole traceback (the table alone would only say "error")."""
    from pmvis.platform.demo.summary import summary_text
    from pmvis.platform.tune.results import SweepResult, TrialRow

    rows = [TrialRow("t_00000", "done", {"fuse.mode": "vote"}, 1.5, 4, str(tmp_path / "a")),
            TrialRow("t_00001", "error", {"fuse.mode": "select"}, None, None, None,
                     error="RuntimeError: worker died", error_file=str(tmp_path / "t1" / "error.txt"))]
    sweep = SweepResult(name="sw", sweep_dir=str(tmp_path), restored=False, max_concurrent=2, rows=rows,
                        best=rows[0], best_config_path=str(tmp_path / "best_config.yaml"), best_trial_path=None,
                        results_path=str(tmp_path / "results.json"), tracking_uri="sqlite:///x.db", experiment="sw")
    text = summary_text(tmp_path, "| table |", sweep, None, {"plots": []}, "sqlite:///x.db", 60.0)
    assert "| t_00001 | select | - | - | error |" in text
    assert f"trial t_00001 failed: RuntimeError: worker died (traceback: {tmp_path / 't1' / 'error.txt'})" in text
    assert "trial t_00000 failed" not in text


def test_side_by_side_training_reraises_a_clear_error_as_itself(ray_session, tmp_path):
    """The demo's concurrent trainings run in Ray tasks: bad input still surfaces as PmvisError
    naming the problem (exit 2 with a message), not as Ray's wrapped task traceback."""
    from mlflow.tracking import MlflowClient

    from pmvis.core.errors import PmvisError
    from pmvis.platform.demo.run import train_side_by_side
    from pmvis.platform.train.config import TrainConfig

    missing = tmp_path / "no-such-data"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig.tiny(missing, iterations=2, run_name="bad", storage_path=str(tmp_path / "runs"), tracking_uri=uri)
    with pytest.raises(PmvisError) as err:
        train_side_by_side([cfg])
    assert not isinstance(err.value, ray_session.exceptions.RayTaskError)  # Ray subclasses the cause
    assert str(missing) in str(err.value) and "Traceback" not in str(err.value)
    # The store and experiment are made before the runs start: two runs creating a new sqlite store
    # at once race in its schema migration ("duplicate column name").
    assert MlflowClient(uri).get_experiment_by_name(cfg.experiment) is not None


def test_demo_missing_data_threshold_follows_the_tracker_engine():
    """The flow engine's confidences are not SAM 2's object scores: Missing-Data takes what it reports."""
    from pmvis.models.sources.propagate import PropagationConfig
    from pmvis.platform.demo.config import TRACK_OPTIONS
    from pmvis.platform.demo.run import filter_config

    assert filter_config(dict(TRACK_OPTIONS)).missing_min_confidence == PropagationConfig().flow_present_threshold
    assert filter_config({"engine": "sam2"}).missing_min_confidence == 0.8
