"""The Ray Data pseudo-mask pipeline: every video once, resume, failures isolated, actor kills."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pmvis.platform.config import build_config
from pmvis.platform.errors import PmvisError
from pmvis.platform.pseudo_masks import PseudoMaskConfig, generate_pseudo_masks
from pmvis.platform.raw_masks import read_raw
from pmvis.platform.synthetic import SynthConfig, generate_synthetic
from pmvis.platform.ytvis import decode_mask, load_dataset_dir

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
