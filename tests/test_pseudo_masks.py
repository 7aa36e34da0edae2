"""The Ray Data pseudo-mask pipeline: every video once, resume, failures isolated, actor kills."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis_io import load_dataset_dir
from pmvis.platform.pseudo.generate import generate_pseudo_masks
from pmvis.platform.pseudo.plan import PseudoMaskConfig
from pmvis.platform.pseudo.store import read_raw

PLUGIN = "source_plugins_for_tests"


@pytest.fixture
def data(tmp_path):
    generate_synthetic(tmp_path / "data", SynthConfig(videos=4, frames=3, height=48, width=64, seed=3))
    return tmp_path / "data"


def _config(**kw) -> PseudoMaskConfig:
    return build_config(PseudoMaskConfig, {"plugins": [PLUGIN], **kw})


def _row_keys(raw_dir):
    return [(t.source, t.video_id, t.annotation_id) for t in read_raw(raw_dir)]


def test_every_annotation_written_once_then_resume_writes_nothing(ray_session, data, tmp_path):
    out = tmp_path / "out"
    s = generate_pseudo_masks(data, out, _config(sources=["fillbox"]), progress=False)
    ds = load_dataset_dir(data)
    assert s.written == {"fillbox": 4} and not s.failures
    keys = _row_keys(out / "raw")
    assert sorted(keys) == sorted(("fillbox", a.video_id, a.id) for a in ds.annotations)
    tracks = {t.annotation_id: t for t in read_raw(out / "raw")}
    for a in ds.annotations:
        t = tracks[a.id]
        assert len(t.segmentations) == ds.videos[a.video_id].length
        for box, seg, conf in zip(a.bboxes, t.segmentations, t.confidences):
            assert (box is None) == (seg is None) == (conf is None)
            if seg is not None:
                assert decode_mask(seg).shape == (48, 64)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "raw").rglob("*.parquet")}
    s2 = generate_pseudo_masks(data, out, _config(sources=["fillbox"]), progress=False)
    assert s2.written == {"fillbox": 0} and s2.skipped == {"fillbox": 4}
    assert {p: p.stat().st_mtime_ns for p in (out / "raw").rglob("*.parquet")} == mtimes
    assert sorted(_row_keys(out / "raw")) == sorted(keys)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stored_videos"] == {"fillbox": 4} and len(manifest["runs"]) == 2


def test_corrupt_frame_fails_only_its_video(ray_session, data, tmp_path):
    ds = load_dataset_dir(data)
    (data / "JPEGImages" / ds.videos[2].file_names[1]).write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(PmvisError) as e:
        generate_pseudo_masks(data, out, _config(sources=["fillbox"]), progress=False)
    msg = str(e.value)
    assert "video id=2" in msg and "1 video(s) failed" in msg and "cannot decode" in msg
    assert sorted({t.video_id for t in read_raw(out / "raw")}) == [1, 3, 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["video_id"] for f in manifest["runs"][-1]["failures"]] == [2]


def test_killed_actor_still_yields_every_video_exactly_once(ray_session, data, tmp_path):
    marker = tmp_path / "killed"
    out = tmp_path / "out"
    cfg = _config(sources=["fillbox_actor"], source_options={"fillbox_actor": {"kill_marker": str(marker)}})
    s = generate_pseudo_masks(data, out, cfg, progress=False)
    assert marker.exists(), "the actor was never killed: the test would prove nothing"
    assert s.written == {"fillbox_actor": 4} and not s.failures
    files = sorted((out / "raw").rglob("*.parquet"))
    assert len(files) == 4
    keys = _row_keys(out / "raw")
    assert len(keys) == len(set(keys)) == len(load_dataset_dir(data).annotations)
    assert sum(pq.read_metadata(f).num_rows for f in files) == len(keys)


def test_dependent_source_gets_init_masks_and_order(ray_session, data, tmp_path):
    out = tmp_path / "out"
    s = generate_pseudo_masks(data, out, _config(sources=["grown", "fillbox"]), progress=False)
    assert s.written == {"fillbox": 4, "grown": 4}
    by = {(t.source, t.annotation_id): t.segmentations for t in read_raw(out / "raw")}
    for (source, aid), segs in by.items():
        if source == "grown":
            assert segs == by[("fillbox", aid)]
    with pytest.raises(PmvisError, match="starts from 'fillbox'"):
        generate_pseudo_masks(data, tmp_path / "other", _config(sources=["grown"]), progress=False)


def test_unknown_source_is_a_clear_error(data, tmp_path):
    with pytest.raises(PmvisError, match="unknown pseudo-mask source 'nope'"):
        generate_pseudo_masks(data, tmp_path / "o", _config(sources=["nope"]), progress=False)


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def _grabcut(**options) -> PseudoMaskConfig:
    return _config(sources=["grabcut"], source_options={"grabcut": options})


def test_other_inputs_regenerate_a_source_same_inputs_resume(ray_session, data, tmp_path):
    """Stored videos are reused only when made from the same inputs (issue 14, item 1)."""
    out = tmp_path / "out"
    folder = out / "raw" / "source=grabcut"
    assert generate_pseudo_masks(data, out, _grabcut(iterations=1), progress=False).written == {"grabcut": 4}
    first = _mtimes(folder)
    # A resource knob (pool size) does not change the masks: resume keeps them.
    s = generate_pseudo_masks(data, out, _grabcut(iterations=1, actors=2), progress=False)
    assert s.skipped == {"grabcut": 4} and not s.regenerated and _mtimes(folder) == first
    # Another option: every video regenerated, and the manifest describes the new files.
    s = generate_pseudo_masks(data, out, _grabcut(iterations=2), progress=False)
    assert s.written == {"grabcut": 4} and s.skipped == {"grabcut": 0}
    assert "options.iterations: 1 -> 2" in s.regenerated["grabcut"]
    second = _mtimes(folder)
    assert second.keys() == first.keys() and all(second[k] != first[k] for k in first)
    record = json.loads((out / "manifest.json").read_text())["sources"]["grabcut"]
    assert record["inputs"]["options"]["iterations"] == 2 and record["stored_videos"] == 4
    # The same options but another annotation file content: regenerated too.
    ann = data / "annotations.json"
    ann.write_text(ann.read_text() + "\n")
    s = generate_pseudo_masks(data, out, _grabcut(iterations=2), progress=False)
    assert s.written == {"grabcut": 4} and "annotations_sha256" in s.regenerated["grabcut"]


def test_a_partial_regeneration_leaves_a_store_its_manifest_describes(ray_session, data, tmp_path):
    out = tmp_path / "out"
    generate_pseudo_masks(data, out, _grabcut(iterations=1), progress=False)
    ds = load_dataset_dir(data)
    frame = data / "JPEGImages" / ds.videos[2].file_names[1]
    good = frame.read_bytes()
    frame.write_bytes(b"garbage")
    with pytest.raises(PmvisError, match="video id=2"):
        generate_pseudo_masks(data, out, _grabcut(iterations=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["grabcut"]["inputs"]["options"]["iterations"] == 2
    assert manifest["stored_videos"] == {"grabcut": 3}
    assert sorted({t.video_id for t in read_raw(out / "raw")}) == [1, 3, 4]  # no iterations=1 video left
    frame.write_bytes(good)
    s = generate_pseudo_masks(data, out, _grabcut(iterations=2), progress=False)
    assert s.written == {"grabcut": 1} and s.skipped == {"grabcut": 3} and not s.regenerated


def test_a_video_that_crashes_its_worker_every_time_fails_alone(ray_session, data, tmp_path):
    """Bounded retries (issue 14, item 2): the crashing video is tried 1 + MAX_TASK_RETRIES times,
    reported with its id, and the other videos are written. (CPU tasks only: the actor-pool case,
    `failing_actor`, behaves the same but takes ~35 s on 2 cores.)"""
    from pmvis.platform.pseudo.generate import MAX_TASK_RETRIES

    source = "failing"
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    out = tmp_path / "out"
    cfg = _config(sources=[source], source_options={source: {"fail_video": 2, "attempts_dir": str(attempts)}})
    with pytest.raises(PmvisError) as e:
        generate_pseudo_masks(data, out, cfg, progress=False)
    assert "1 video(s) failed" in str(e.value) and f"{source}: video id=2" in str(e.value)
    assert len(list(attempts.iterdir())) == 1 + MAX_TASK_RETRIES
    assert sorted({t.video_id for t in read_raw(out / "raw")}) == [1, 3, 4]
    assert [f["video_id"] for f in json.loads((out / "manifest.json").read_text())["runs"][-1]["failures"]] == [2]


def test_a_deterministic_source_error_is_not_retried(ray_session, data, tmp_path):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    cfg = _config(sources=["failing"], source_options={
        "failing": {"fail_video": 2, "how": "raise", "attempts_dir": str(attempts)}})
    with pytest.raises(PmvisError, match="video id=2: deterministic test failure"):
        generate_pseudo_masks(data, tmp_path / "out", cfg, progress=False)
    assert len(list(attempts.iterdir())) == 1


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started before the input was checked")


@pytest.mark.parametrize("args, message", [
    (["--option", "grabcut.iterations=0"], "--option grabcut.iterations: Input should be greater than or equal to 1"),
    (["--option", "grabcut.nope=1"], "--option grabcut.nope: Extra inputs are not permitted"),
    (["--sources", "hqsam", "--option", "hqsam.checkpoint={tmp}/missing.pth"], "missing.pth not found"),
    (["--sources", "hqsam", "--option", "hqsam.checkpoint={tmp}/garbage.pth"], "garbage.pth is not a torch checkpoint"),
    (["--annotations", "nope.json"], "nope.json"),
])
def test_bad_input_fails_before_ray_starts(data, tmp_path, monkeypatch, capsys, args, message):
    """Issue 14, item 3: options, checkpoints and the annotation file are checked before connect()."""
    import pmvis.platform.cluster as cluster
    from pmvis import cli

    monkeypatch.setattr(cluster, "connect", _no_ray)
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    argv = ["pseudo-masks", "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress",
            *[a.format(tmp=tmp_path) for a in args]]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_is_checked_and_its_content_keys_the_fingerprint(data, tmp_path):
    import torch

    from pmvis.platform.pseudo.plan import prepare_pseudo_masks

    ckpt = tmp_path / "w.pth"
    cfg = _config(sources=["hqsam"], source_options={"hqsam": {"checkpoint": str(ckpt)}})

    def fingerprint():
        return prepare_pseudo_masks(data, tmp_path / "out", cfg).sources[0].fingerprint

    torch.save({"w": torch.zeros(3)}, ckpt)
    first = fingerprint()
    assert fingerprint() == first
    torch.save({"w": torch.ones(3)}, ckpt)  # same path, other weights
    assert fingerprint() != first
