"""Training on Ray Train: the clip sampler, resume (helper and real runs), MLflow logging, a killed
worker, a refused checkpoint, a non-finite loss. Tiny model, 64 px synthetic videos."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pmvis.core.errors import PmvisError
from pmvis.platform.data.clips import ClipSampler
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.vis_data import DataConfig, load_training_data, split_videos
from pmvis.platform.data.ytvis_io import load_dataset_dir, save_ytvis
from pmvis.platform.train.checkpoints import latest_checkpoint
from pmvis.platform.train.config import TrainConfig
from pmvis.platform.train.driver import run_training
from pmvis.platform.train.loop import TrainingLoop, restore_training_state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train") / "data"
    generate_synthetic(d, SynthConfig(videos=3, frames=4, height=64, width=64))
    return d


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow sqlite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(data_dir, **kw) -> TrainConfig:
    return TrainConfig.tiny(data_dir, **kw)


def sampler(data_dir, *, need_gt=False, need_pseudo=False, weighting=False, rank=0, world=1, batch_size=2, **data_kw):
    cfg = DataConfig(data_dir=str(data_dir), short_side=None, max_size=None, val_fraction=0.0, **data_kw)
    data = load_training_data(cfg, num_classes=5, need_gt_masks=need_gt, need_pseudo=need_pseudo)
    return ClipSampler(data, cfg, batch_size=batch_size, stride=4, seed=0, rank=rank, world_size=world,
                       need_gt_masks=need_gt, need_pseudo=need_pseudo, pseudo_quality_weighting=weighting)


# ------------------------------------------------------------------ clip sampler


def test_clip_shapes_frames_in_range_and_key_frame_annotated(data_dir):
    s = sampler(data_dir, batch_size=3, clip_frames=3, reference_range=1)
    ds = s.data.dataset
    for it in range(6):
        b = s.batch(it)
        assert b.images.shape == (9, 3, 64, 64) and b.images.dtype == torch.uint8
        assert b.padding_mask.shape == (9, 64, 64) and not b.padding_mask.any()
        for vid, frames, labels in zip(b.video_ids, b.frame_indices, b.labels):
            key, refs = frames[0], frames[1:]
            assert len(frames) == 3 and refs == sorted(refs)
            assert all(abs(t - key) <= 1 for t in refs)
            assert labels[0].labels.numel() >= 1  # the key frame has an instance
            for t, f in zip(frames, labels):
                boxed = {a.id for a in ds.annotations if a.video_id == vid and a.bboxes[t] is not None}
                assert set(f.instance_ids.tolist()) == boxed
                assert ((f.boxes > 0) & (f.boxes <= 1)).all()
        targets = b.targets("cpu", bottom_pixels=10)
        assert targets[0][0].box_masks.shape[-2:] == (16, 16) and targets[0][0].images_lab.shape == (3, 16, 16)
    assert s.batch(3).frame_indices == s.batch(3).frame_indices  # a pure function of the iteration


def test_native_size_pads_and_resizes_from_config(data_dir):
    s = sampler(data_dir, batch_size=2)
    s.cfg = s.cfg.model_copy(update={"short_side": (40, 40), "size_divisibility": 32})
    b = s.batch(0)
    assert b.images.shape[-2:] == (64, 64)  # 40 px frames padded to 64
    assert b.padding_mask[:, 40:, :].all() and not b.padding_mask[:, :40, :40].any()


def test_flip_keeps_boxes_and_masks_consistent(data_dir):
    kw = dict(need_gt=True, annotations="truth.json", batch_size=2)  # true masks: boxes are tight
    plain, flipped = sampler(data_dir, flip_prob=0.0, **kw), sampler(data_dir, flip_prob=1.0, **kw)
    from pmvis.models.vis import box_masks_from_boxes

    for it in range(4):
        a, b = plain.batch(it), flipped.batch(it)
        assert a.frame_indices == b.frame_indices and b.flipped == [True, True]
        assert torch.equal(b.images, a.images.flip(-1))
        for fa, fb in zip(sum(a.labels, []), sum(b.labels, [])):
            assert torch.equal(fa.instance_ids, fb.instance_ids)
            mirrored = fa.boxes.clone()
            mirrored[:, 0] = 1 - mirrored[:, 0]
            assert torch.allclose(fb.boxes, mirrored, atol=1e-6)
            for f in (fa, fb):  # every mask pixel lies inside its own box
                boxes = box_masks_from_boxes(f.boxes, (64, 64), 4)
                assert f.gt_masks is not None and (f.gt_masks <= boxes).all()
                assert (f.gt_masks.sum((1, 2)) > 0).all()


def test_excluded_frames_are_never_sampled(data_dir, tmp_path):
    ds = load_dataset_dir(data_dir)
    ann = ds.annotations[0]
    ann.extra["excluded_frames"] = [1, 2]
    save_ytvis(ds, tmp_path / "filtered.json")
    s = sampler(data_dir, annotations=str(tmp_path / "filtered.json"), batch_size=4, reference_range=3)
    seen = set()
    for it in range(25):
        b = s.batch(it)
        for vid, frames in zip(b.video_ids, b.frame_indices):
            if vid == ann.video_id:
                seen.update(frames)
    assert seen and not seen & {1, 2}


def test_shards_are_disjoint_and_cover_the_training_videos(data_dir):
    shards = [sampler(data_dir, rank=r, world=2).video_ids for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == [1, 2, 3]
    assert set(sampler(data_dir, rank=1, world=2).batch(0).video_ids) <= set(shards[1])
    with pytest.raises(PmvisError, match="cannot be sharded over 4 workers"):
        sampler(data_dir, rank=0, world=4)


def test_split_is_deterministic_and_held_out_videos_are_not_trained(data_dir):
    cfg = DataConfig(data_dir=str(data_dir), val_fraction=0.34, split_seed=5)
    train, val = split_videos([1, 2, 3], cfg)
    assert len(val) == 1 and sorted(train + val) == [1, 2, 3] and split_videos([3, 2, 1], cfg) == (train, val)
    assert split_videos([1, 2, 3], cfg.model_copy(update={"val_videos": [2]})) == ([1, 3], [2])
    data = load_training_data(cfg, num_classes=5)
    assert data.eval_gt is not None and sorted(data.eval_gt.videos) == val
    s = ClipSampler(data, cfg, batch_size=1, stride=4)
    assert s.video_ids == train
    with pytest.raises(PmvisError, match="model.num_classes is 3"):
        load_training_data(cfg, num_classes=3)


def test_pseudo_masks_and_quality_weights(data_dir, tmp_path):
    ds = load_dataset_dir(data_dir, "truth.json")
    for a in ds.annotations:
        a.extra["quality"] = 0.5
    gone = ds.annotations[0]
    gone.segmentations = [None] * len(gone.segmentations)  # no pseudo mask anywhere for this one
    save_ytvis(ds, tmp_path / "fused.json")
    for weighting, expect in ((True, 0.5), (False, 1.0)):
        s = sampler(data_dir, need_pseudo=True, weighting=weighting, pseudo_annotations=str(tmp_path / "fused.json"),
                    batch_size=3)
        checked = 0
        for it in range(6):
            for f in sum(s.batch(it).labels, []):
                assert f.pseudo_masks is not None and f.pseudo_masks.shape == (f.labels.numel(), 16, 16)
                for i, w in zip(f.instance_ids.tolist(), f.pseudo_weights.tolist()):
                    assert w == (0.0 if i == gone.id else expect)
                    checked += 1
        assert checked
    bad = ds.to_json()
    bad["annotations"][1]["id"] = 12345
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PmvisError, match="annotation id=12345: not in the training annotations"):
        sampler(data_dir, need_pseudo=True, pseudo_annotations=str(tmp_path / "bad.json"))


# ------------------------------------------------------------------ resume helper (no Ray)


def test_resume_continues_iterations_and_optimizer_state_exactly(data_dir, tmp_path):
    from pmvis.models.vis.checkpoint import read_checkpoint

    cfg = tiny(data_dir, model={"dropout": 0.0}, lr_steps=[3], data={"prefetch": False})
    straight = TrainingLoop(cfg)
    for it in range(4):
        straight.step(it)
    first = TrainingLoop(cfg)
    for it in range(2):
        first.step(it)
    first.save(tmp_path / "checkpoint.pt", mlflow_run_id="abc")
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 2 and state["extra"]["mlflow_run_id"] == "abc"
    assert state["extra"]["category_ids"] == [1, 2, 3, 4, 5]

    resumed = TrainingLoop(cfg)
    assert resumed.restore(state) == 2
    opt_a, opt_b = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in opt_a["state"]:
        assert opt_b["state"][k]["step"] == opt_a["state"][k]["step"] == 2
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])
    for it in range(resumed.iteration, 4):
        resumed.step(it)
    assert resumed.iteration == straight.iteration == 4
    assert resumed.lrs() == straight.lrs() == {"lr": pytest.approx(1e-4), "lr_backbone": pytest.approx(1e-4)}
    for (name, a), b in zip(straight.core.state_dict().items(), resumed.core.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    for loop in (straight, first, resumed):
        loop.close()


def test_checkpoint_of_another_model_config_is_refused(data_dir, tmp_path):
    from pmvis.models.vis.checkpoint import read_checkpoint

    other = TrainingLoop(tiny(data_dir, model={"hidden_dim": 64}, data={"prefetch": False}))
    other.save(tmp_path / "checkpoint.pt")
    loop = TrainingLoop(tiny(data_dir, data={"prefetch": False}))
    with pytest.raises(PmvisError, match=r"different model config \(hidden_dim: checkpoint 64 vs config 32"):
        restore_training_state(read_checkpoint(tmp_path), loop.core, loop.optimizer, loop.scheduler, loop.cfg.model)
    with pytest.raises(PmvisError, match="different model config"):  # also as init_from, before Ray starts
        run_training(tiny(data_dir, init_from=str(tmp_path / "checkpoint.pt"), storage_path=str(tmp_path / "runs"),
                          tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"))


def test_nonfinite_loss_is_detected_before_the_step(data_dir):
    from pmvis.platform.train.loop import NonFiniteLoss

    loop = TrainingLoop(tiny(data_dir, debug={"nan_at_iteration": 1}, data={"prefetch": False}))
    loop.step(0)
    before = {k: v.detach().clone() for k, v in loop.core.named_parameters()}
    with pytest.raises(NonFiniteLoss, match="non-finite loss at iteration 1"):
        loop.step(1)
    assert loop.iteration == 1 and loop.scheduler.last_epoch == 1
    assert all(torch.equal(before[k], v) for k, v in loop.core.named_parameters())  # the step was not taken


def test_config_overrides_and_cli_help(data_dir, capsys):
    from pmvis.cli import main
    from pmvis.platform.train.config import train_config_from

    cfg = train_config_from(None, [f"data.data_dir={data_dir}", "model.hidden_dim=64", "iterations=7",
                                    "data.short_side=[32, 48]"], preset="tiny")
    assert cfg.model.hidden_dim == 64 and cfg.iterations == 7 and cfg.data.short_side == (32, 48)
    assert cfg.model.backbone == "regnetx_004" and cfg.use_gpu is False
    assert TrainConfig(data={"data_dir": "x"}).model.backbone == "resnet50"  # the paper preset
    with pytest.raises(PmvisError, match="model.hidden_dimm"):
        train_config_from(None, [f"data.data_dir={data_dir}", "model.hidden_dimm=64"])
    with pytest.raises(PmvisError, match="pseudo_annotations"):
        train_config_from(None, [f"data.data_dir={data_dir}", "loss.mode=pmvis"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--set" in capsys.readouterr().out


# ------------------------------------------------------------------ Ray Train runs


def _mlflow_runs(tracking_uri, experiment):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def _progress_lines(run_name):
    """(world rank, message) of a run's progress lines in the order they were written, from Ray
    Train's worker log files (JSON records; the session's Ray does not forward worker output to this
    process). Files are named by random worker ids, so order comes from each record's time."""
    import glob

    logs = os.path.join(_ray_session_dir(), "logs", "train")
    records = []
    for path in glob.glob(os.path.join(logs, "ray-train-app-worker-*.log")):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if r.get("run_name") == run_name and " iter: " in r.get("message", "")]
    records.sort(key=lambda r: (int(r.get("timestamp_ns", 0)), r.get("asctime", "")))
    return [(r.get("world_rank"), r["message"]) for r in records]


def _ray_session_dir():
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def test_two_workers_train_checkpoint_log_then_resume_with_the_same_name(ray_session, data_dir, tmp_path,
                                                                         tracking_uri):
    from mlflow.tracking import MlflowClient

    common = dict(run_name="two", storage_path=str(tmp_path / "runs"), tracking_uri=tracking_uri,
                  experiment="two-workers", batch_size=1, checkpoint_every=2, log_every=1, print_every=3)
    r = run_training(tiny(data_dir, iterations=4, num_workers=2, eval_every=2, **common))
    # One progress line every print_every iterations and after the last, from rank 0 only.
    lines = _progress_lines("two")
    assert [rank for rank, _ in lines] == [0, 0], lines
    assert "] eta: " in lines[0][1] and " iter: 3/4  it/s: " in lines[0][1] and " iter: 4/4 " in lines[1][1]
    assert lines[0][1].startswith("[two] ") and " total_loss: " in lines[0][1] and " lr: 1.0e-03" in lines[0][1]
    assert " class: " in lines[0][1] and "class_0" not in lines[0][1]
    assert (r.start_iteration, r.iteration) == (0, 4)
    assert r.checkpoint.endswith("checkpoint_00000004") and os.path.isfile(os.path.join(r.checkpoint, "checkpoint.pt"))
    assert latest_checkpoint(r.run_dir) == r.checkpoint
    assert {"loss", "class", "proj", "pairwise", "track", "lr", "it_per_s"} <= set(r.metrics)
    assert os.path.isfile(os.path.join(r.run_dir, "config.yaml"))
    runs = _mlflow_runs(tracking_uri, "two-workers")
    assert len(runs) == 1 and runs[0].info.run_id == r.mlflow_run_id and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["model.hidden_dim"] == "32" and params["num_workers"] == "2" and params["data.clip_frames"] == "2"
    client = MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "loss")] == [1, 2, 3, 4]
    assert "config.yaml" in {a.path for a in client.list_artifacts(r.mlflow_run_id)}
    if r.evaluation is not None:  # the inference module is there: the held-out video was scored
        assert {"AP", "AR10"} <= set(r.evaluation) and "eval_AP" in r.metrics
        assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "eval_AP")] == [2, 4]
        assert os.path.isfile(os.path.join(r.run_dir, "evaluation.json"))
        assert "evaluation.json" in {a.path for a in client.list_artifacts(r.mlflow_run_id)}

    # Ctrl-C can leave the checkpoints without Ray's snapshot file: resume from them all the same.
    os.remove(os.path.join(r.run_dir, "checkpoint_manager_snapshot.json"))
    again = run_training(tiny(data_dir, iterations=6, num_workers=1, **common))
    assert (again.start_iteration, again.iteration) == (4, 6)
    assert again.checkpoint.endswith("checkpoint_00000006")
    assert again.mlflow_run_id == r.mlflow_run_id and len(_mlflow_runs(tracking_uri, "two-workers")) == 1
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.split(" iter: ")[1].split()[0] for _, m in _progress_lines("two")] == ["3/4", "4/4", "6/6"]

    with pytest.raises(PmvisError, match=r"checkpoint_00000006.*different model config.*hidden_dim"):
        run_training(tiny(data_dir, iterations=8, model={"hidden_dim": 64}, **common))


def test_a_gpu_request_on_a_cpu_cluster_is_refused_up_front(ray_session, data_dir):
    from pmvis.platform.train.driver import check_resources

    check_resources(tiny(data_dir, num_workers=2))
    with pytest.raises(PmvisError, match="no GPU"):
        check_resources(tiny(data_dir, use_gpu=True))
    with pytest.raises(PmvisError, match="3 workers need 3 CPUs"):
        check_resources(tiny(data_dir, num_workers=3))


def test_a_pmvis_error_in_a_worker_surfaces_as_itself(ray_session, data_dir, tmp_path, tracking_uri):
    """A bad input found only in one worker ends the run with that PmvisError's message, with Ray
    Train's console chatter turned down (pmvis.platform.ray_logs), and is not retried: the error
    fires once only (fail_marker), so a restarted worker group would have finished the run."""
    marker = tmp_path / "failed-once"
    cfg = tiny(data_dir, iterations=2, batch_size=1, num_workers=2, run_name="worker-error",
               experiment="worker-error", storage_path=str(tmp_path / "runs"), tracking_uri=tracking_uri,
               max_failures=2, debug={"fail_at_iteration": 1, "fail_rank": 1, "fail_mode": "error",
                                      "fail_marker": str(marker)})
    with pytest.raises(PmvisError, match=r"^debug: injected error at iteration 1 on rank 1$"):
        run_training(cfg)
    assert marker.exists()
    runs = _mlflow_runs(tracking_uri, "worker-error")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


@pytest.mark.slow
def test_nan_loss_stops_naming_iteration_and_last_good_checkpoint(ray_session, data_dir, tmp_path, tracking_uri):
    cfg = tiny(data_dir, iterations=4, checkpoint_every=2, batch_size=1, run_name="nan", experiment="nan",
               storage_path=str(tmp_path / "runs"), tracking_uri=tracking_uri, debug={"nan_at_iteration": 3},
               max_failures=2)
    with pytest.raises(PmvisError, match=r"non-finite loss at iteration 3 .*last good checkpoint: .*checkpoint_00000002"):
        run_training(cfg)
    runs = _mlflow_runs(tracking_uri, "nan")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(ray_session, data_dir, tmp_path, tracking_uri):
    marker = tmp_path / "killed-once"
    cfg = tiny(data_dir, iterations=4, checkpoint_every=2, batch_size=1, num_workers=2, max_failures=1,
               run_name="kill", experiment="kill", storage_path=str(tmp_path / "runs"), tracking_uri=tracking_uri,
               debug={"fail_at_iteration": 3, "fail_rank": 1, "fail_marker": str(marker), "fail_delay_s": 5.0})
    r = run_training(cfg)
    assert marker.exists()  # rank 1 did die at iteration 3
    assert (r.start_iteration, r.iteration) == (2, 4)  # the restarted group resumed from checkpoint 2
    assert r.checkpoint.endswith("checkpoint_00000004")
    assert len(_mlflow_runs(tracking_uri, "kill")) == 1
