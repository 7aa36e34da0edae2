"""Hardened edges of training runs (issue 14), without starting Ray: resume from the newest complete
checkpoint on disk, checkpoints verified against their recorded size and hash, the run lock, the
Ctrl-C message and exit status, stale temporary checkpoints, checks in preflight, config limits."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from pmvis.core.errors import PmvisError
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.train.checkpoints import (
    CHECKPOINT_META,
    checkpoint_dir_name,
    latest_checkpoint,
    read_checkpoint_meta,
    write_checkpoint_dir,
)
from pmvis.platform.train.config import TrainConfig
from pmvis.platform.train.driver import preflight, run_dir_of, run_lock
from pmvis.platform.train.loop import TrainingLoop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges") / "data"
    generate_synthetic(d, SynthConfig(videos=3, frames=4, height=64, width=64))
    return d


@pytest.fixture(scope="module")
def loop(data_dir):
    """One real training loop; its checkpoints are written as the workers write them."""
    lp = TrainingLoop(TrainConfig.tiny(data_dir, data={"prefetch": False}))
    yield lp
    lp.close()


def cfg_for(data_dir, tmp_path, **kw) -> TrainConfig:
    return TrainConfig.tiny(data_dir, run_name="edge", storage_path=str(tmp_path / "runs"), **kw)


def write_run(loop, run_dir, iterations=(5, 10)):
    """checkpoint_<it> directories as an interrupted run leaves them: no Ray snapshot file."""
    for it in iterations:
        loop.iteration = it
        write_checkpoint_dir(loop, run_dir / checkpoint_dir_name(it), {"mlflow_run_id": "run-abc"})
    loop.iteration = 0
    return [run_dir / checkpoint_dir_name(it) for it in iterations]


# ------------------------------------------------------------------ resume: newest complete checkpoint


def test_resume_without_rays_snapshot_uses_the_newest_checkpoint_on_disk(data_dir, loop, tmp_path):
    cfg = cfg_for(data_dir, tmp_path)
    run_dir = tmp_path / "runs" / "edge"
    _, ten = write_run(loop, run_dir)
    assert latest_checkpoint(run_dir) == str(ten)  # was None: only Ray's snapshot file was read
    resolved, meta = preflight(cfg)
    assert meta["iteration"] == 10 and meta["mlflow_run_id"] == "run-abc" and meta["path"] == str(ten)
    assert run_dir_of(resolved) == str(run_dir)


def test_a_truncated_or_modified_checkpoint_is_skipped_for_the_previous_one(loop, tmp_path, caplog):
    five, ten = write_run(loop, tmp_path)
    pt = ten / "checkpoint.pt"
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 3])  # the copy into storage cut short (a full disk)
    with caplog.at_level(logging.WARNING, logger="pmvis.platform.train.checkpoints"):
        assert latest_checkpoint(tmp_path) == str(five)
    assert "incomplete copy" in caplog.text and str(ten) in caplog.text
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, other bytes: a tampered or bit-rotted file
    pt.write_bytes(bytes(flipped))
    assert latest_checkpoint(tmp_path) == str(five)
    (ten / CHECKPOINT_META).write_text('{"iteration": 1')  # a record cut short
    assert latest_checkpoint(tmp_path) == str(five)
    with pytest.raises(PmvisError, match=re.escape(f"{ten / CHECKPOINT_META}: not a readable checkpoint record")):
        read_checkpoint_meta(ten)
    (five / "checkpoint.pt").write_bytes(b"")  # nothing complete left: say so, never start over silently
    with pytest.raises(PmvisError, match="no complete checkpoint to resume from"):
        latest_checkpoint(tmp_path)


def test_preflight_refuses_a_resume_checkpoint_with_a_bad_record(data_dir, loop, tmp_path):
    cfg = cfg_for(data_dir, tmp_path)
    _, ten = write_run(loop, tmp_path / "runs" / "edge")
    meta_path = ten / CHECKPOINT_META
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["hidden_dimm"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PmvisError, match=re.escape(f"{ten}: model_config: hidden_dimm: Extra inputs are not permitted")):
        preflight(cfg)
    del meta["model_config"]["hidden_dimm"], meta["fingerprint"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PmvisError, match=re.escape(f"{ten}: checkpoint record has no fingerprint")):
        preflight(cfg)


def test_a_checkpoint_with_an_unknown_model_config_key_is_a_clear_error(loop, tmp_path):
    import torch

    from pmvis.models.vis.checkpoint import load_model

    path = loop.save(tmp_path / "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    state["model_config"]["hidden_dimm"] = 32
    torch.save(state, path)
    with pytest.raises(PmvisError, match=r"checkpoint.pt: model_config: hidden_dimm: Extra inputs"):
        load_model(path)


# ------------------------------------------------------------------ preflight: before Ray starts


def test_preflight_finds_missing_frames_and_bad_backbone_weights(data_dir, tmp_path):
    import shutil

    import torch

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    frame = next(iter(sorted((data / "JPEGImages").rglob("*.jpg"))))
    frame.unlink()
    with pytest.raises(PmvisError, match=rf"1 frame files are missing: video id=\d+, frame \d+ \({frame}\)"):
        preflight(cfg_for(data, tmp_path))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "backbone.pt")
    with pytest.raises(PmvisError, match="backbone.pt: does not fit the backbone"):
        preflight(cfg_for(data_dir, tmp_path, model={"backbone_weights": str(tmp_path / "backbone.pt")}))


# ------------------------------------------------------------------ the run lock


FLOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy", flush=True)
        raise SystemExit
    os.pwrite(fd, b"%d on elsewhere" % os.getpid(), 0)
    print("held", flush=True)
    sys.stdin.readline()
""")  # another process taking the run's flock, without importing pmvis (torch: seconds)


def test_a_second_run_of_the_same_name_is_refused_while_the_first_holds_the_lock(tmp_path):
    from pmvis.platform.train.driver import RUN_LOCK_FILENAME

    run_dir = tmp_path / "run"
    lock = str(run_dir / RUN_LOCK_FILENAME)
    with run_lock(str(run_dir)):  # this process runs it: another one cannot take the lock
        with run_lock(str(run_dir)):  # re-entrant in one process: the CLI holds it around run_training
            pass
        other = subprocess.run([sys.executable, "-c", FLOCK, lock], input="", capture_output=True, text=True)
        assert other.stdout.strip() == "busy"
    holder = subprocess.Popen([sys.executable, "-c", FLOCK, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PmvisError, match=rf"run run is already running \(pid {holder.pid} on elsewhere\); "
                                             "wait for it or choose another run_name"):
            with run_lock(str(run_dir)):
                pass
    finally:
        holder.kill()  # a dead holder's lock is released by the OS
        holder.wait()
    with run_lock(str(run_dir)):
        pass


# ------------------------------------------------------------------ Ctrl-C


def test_an_interrupted_run_says_where_it_resumes_and_exits_130(data_dir, loop, tmp_path, capsys, monkeypatch):
    import pmvis.jobs.train as train_job
    from pmvis.cli import EXIT_INTERRUPTED, main
    from pmvis.platform.train.driver import TrainingInterrupted, _interrupted_message

    cfg = cfg_for(data_dir, tmp_path)
    write_run(loop, tmp_path / "runs" / "edge")
    message = _interrupted_message(cfg)
    assert message == ("run edge interrupted at iteration 10 (its last complete checkpoint); "
                       "rerun the same command to resume")

    def interrupted(args):  # what run_training raises when Ray Train's SIGINT handler ends fit()
        raise TrainingInterrupted(message)

    monkeypatch.setattr(train_job, "run", interrupted)
    assert main(["train"]) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == f"pmvis train: {message}\n"


def test_temporary_checkpoints_of_dead_workers_are_removed(tmp_path):
    from pmvis.platform.train.checkpoints import TEMP_CHECKPOINT_PREFIX, remove_stale_temp_checkpoints

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TEMP_CHECKPOINT_PREFIX}{dead.pid}-abc"
    mine = tmp_path / f"{TEMP_CHECKPOINT_PREFIX}{os.getpid()}-def"
    foreign = tmp_path / f"{TEMP_CHECKPOINT_PREFIX}xyz"  # not ours to judge
    for d in (stale, mine, foreign):
        d.mkdir()
        (d / "checkpoint.pt").write_bytes(b"x")
    assert remove_stale_temp_checkpoints(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and foreign.exists()


# ------------------------------------------------------------------ config limits


@pytest.mark.parametrize("override, where", [
    ("lr=.inf", "lr: Input should be a finite number"),
    ("lr=.nan", "lr: Input should be a finite number"),
    ("lr_gamma=.inf", "lr_gamma: Input should be a finite number"),
    ("run_name=\"a\\0b\"", "run_name must be a plain directory name"),
    ("run_name=a/b", "run_name must be a plain directory name"),
    ("run_name=''", "run_name must be a plain directory name"),
    ("data.split_seed=-1", "data.split_seed: Input should be greater than or equal to 0"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("lr_mults={mask_branch.: -1}", "lr_mults needs non-empty parameter-name prefixes and finite multipliers"),
    ("lr_mults={mask_branch.: .inf}", "lr_mults"),
])
def test_bad_knobs_are_config_errors(data_dir, override, where):
    from pmvis.platform.train.config import train_config_from

    with pytest.raises(PmvisError, match=where):
        train_config_from(None, [f"data.data_dir={data_dir}", override], preset="tiny")


def test_the_final_checkpoint_is_the_newest_complete_one(loop, tmp_path, caplog):
    from types import SimpleNamespace

    from pmvis.platform.train.checkpoints import final_checkpoint

    five, ten = write_run(loop, tmp_path)
    pt = ten / "checkpoint.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    reported = SimpleNamespace(checkpoint=SimpleNamespace(path=str(ten)))  # what Ray's Result says
    with caplog.at_level(logging.WARNING, logger="pmvis.platform.train.checkpoints"):
        assert final_checkpoint(str(tmp_path), reported) == str(five)
    assert f"the last reported checkpoint {ten} is not complete" in caplog.text
    # a finished run started again without Ray's snapshot: Ray reports no checkpoint at all
    assert final_checkpoint(str(tmp_path), SimpleNamespace(checkpoint=None)) == str(five)


def test_lr_mults_give_named_parameter_groups_their_own_lr(data_dir):
    from pmvis.models.vis import build_model
    from pmvis.platform.train.loop import build_optimizer

    cfg = TrainConfig.tiny(data_dir, lr=1e-4, backbone_lr_mult=0.5,
                           lr_mults={"mask_branch.": 10, "mask_branch.out.": 0, "controller.": 3})
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert opt.param_groups[0]["name"] == "main"  # group 0 stays the main lr (progress lines)
    assert lrs == pytest.approx({"main": 1e-4, "backbone": 5e-5, "mask_branch": 1e-3, "mask_branch.out": 0.0,
                                 "controller": 3e-4})
    groups = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    named = dict(model.named_parameters())
    # the longest prefix wins: mask_branch.out.* is in its own group, not in mask_branch's
    assert id(named["mask_branch.out.weight"]) in groups["mask_branch.out"]
    assert id(named["mask_branch.out.weight"]) not in groups["mask_branch"]
    assert id(named["mask_branch.lateral.weight"]) in groups["mask_branch"]
    assert sum(len(v) for v in groups.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(PmvisError, match="no trainable parameter name starts with"):
        build_optimizer(model, TrainConfig.tiny(data_dir, lr_mults={"mask_brnch.": 10}))
