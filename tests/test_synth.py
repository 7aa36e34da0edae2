"""The synthetic YTVIS generator: deterministic, well-formed, with real and fully listed defects."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pydantic import ValidationError

from pmvis import cli
from pmvis.core.errors import PmvisError
from pmvis.platform.data import synthetic
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import CATEGORIES, SynthConfig, render_video

SMALL = dict(videos=3, frames=6, height=64, width=80)


def _load(d: Path, name: str):
    return json.loads((d / name).read_text())


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _decode(rle) -> np.ndarray:
    return mask_utils.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("synth") / "small"
    return d, generate_synthetic(d, SynthConfig(**SMALL))


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, dict]:
    """Enough videos to exercise enter/leave, occlusion, several categories and both defect kinds."""
    d = tmp_path_factory.mktemp("synth") / "large"
    return d, generate_synthetic(d, SynthConfig(videos=6, frames=8, height=64, width=80))


def test_deterministic(small, tmp_path):
    d, _ = small
    again = tmp_path / "again"
    generate_synthetic(again, SynthConfig(**SMALL))
    assert _files(again) == _files(d)
    other = tmp_path / "other"
    generate_synthetic(other, SynthConfig(**SMALL, seed=1))
    for name in ("annotations.json", "truth.json", "JPEGImages/video_0001/00000.jpg"):
        assert (other / name).read_bytes() != (d / name).read_bytes()


def test_video_independent_of_others():
    a = render_video(SynthConfig(**SMALL), 2)
    b = render_video(SynthConfig(**{**SMALL, "videos": 9}), 2)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.visible, b.visible)


def test_well_formed(small):
    d, summary = small
    cfg = SynthConfig(**SMALL)
    truth, user = _load(d, "truth.json"), _load(d, "annotations.json")
    assert [v["id"] for v in truth["videos"]] == [1, 2, 3]
    assert [c["id"] for c in truth["categories"]] == list(range(1, len(CATEGORIES) + 1))
    assert [a["id"] for a in truth["annotations"]] == list(range(1, len(truth["annotations"]) + 1))
    assert [a["id"] for a in user["annotations"]] == [a["id"] for a in truth["annotations"]]
    assert truth["videos"] == user["videos"] and truth["categories"] == user["categories"]
    lengths = {v["id"]: v["length"] for v in truth["videos"]}
    for v in truth["videos"]:
        assert (v["length"], v["height"], v["width"]) == (cfg.frames, cfg.height, cfg.width)
        assert len(v["file_names"]) == v["length"]
        for name in v["file_names"]:
            assert name.startswith(f"video_{v['id']:04d}/")
            img = cv2.imread(str(d / "JPEGImages" / name))
            assert img is not None and img.shape == (cfg.height, cfg.width, 3)
    for a in truth["annotations"]:
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= len(CATEGORIES)
        n = lengths[a["video_id"]]
        assert len(a["segmentations"]) == len(a["bboxes"]) == len(a["areas"]) == n
        assert any(s is not None for s in a["segmentations"])
        for seg, box, area in zip(a["segmentations"], a["bboxes"], a["areas"]):
            assert (seg is None) == (box is None) == (area is None)
            if seg is None:
                continue
            assert seg["size"] == [cfg.height, cfg.width] and isinstance(seg["counts"], str)
            m = _decode(seg)
            assert area == int(m.sum()) >= cfg.min_visible_pixels
            assert box == [float(x) for x in mask_utils.toBbox(seg)]
    assert summary["instances"] == len(truth["annotations"]) and summary["videos"] == 3
    assert summary["masks"] == sum(s is not None for a in truth["annotations"] for s in a["segmentations"])


def _check_defects(d: Path) -> dict[str, int]:
    truth, user = _load(d, "truth.json"), _load(d, "annotations.json")
    listed = {(x["annotation_id"], x["frame"]): x for x in _load(d, "defects.json")}
    found = {"inaccurate": 0, "missing": 0}
    for ta, ua in zip(truth["annotations"], user["annotations"]):
        assert ua["category_id"] == ta["category_id"] and ua["video_id"] == ta["video_id"]
        assert any(s is not None for s in ua["segmentations"])  # never all frames missing
        for t, (ts, us) in enumerate(zip(ta["segmentations"], ua["segmentations"])):
            defect = listed.pop((ta["id"], t), None)
            if defect is None:  # no silent differences
                assert us == ts and ua["bboxes"][t] == ta["bboxes"][t] and ua["areas"][t] == ta["areas"][t]
                continue
            assert defect["video_id"] == ta["video_id"] and defect["detail"]
            found[defect["kind"]] += 1
            assert ts is not None
            if defect["kind"] == "missing":
                assert us is None and ua["bboxes"][t] is None and ua["areas"][t] is None
            else:
                assert defect["kind"] == "inaccurate"
                bad, good = _decode(us), _decode(ts)
                assert bad.any() and not np.array_equal(bad, good) and bad.shape == good.shape
                assert ua["bboxes"][t] == ta["bboxes"][t]  # the box is trusted: it stays true
                assert ua["areas"][t] == int(bad.sum())
    assert not listed, f"defects listed for frames that do not exist: {listed}"
    return found


def test_defects_real_and_listed(small, large):
    for d, summary in (small, large):
        assert _check_defects(d) == summary["defects"]
    assert all(n > 0 for n in large[1]["defects"].values())


def test_dataset_exercises_nulls_occlusion_categories(large):
    d, summary = large
    truth = _load(d, "truth.json")
    assert any(s is None for a in truth["annotations"] for s in a["segmentations"])
    assert summary["null_masks"] > 0 and summary["occluded_masks"] > 0
    assert len({a["category_id"] for a in truth["annotations"]}) > 1
    # recount from the renderer: a visible mask is its shape minus what is drawn above it
    cfg = SynthConfig(videos=6, frames=8, height=64, width=80)
    videos = [render_video(cfg, i) for i in range(cfg.videos)]
    occluded = sum(int((v.present & (v.visible.sum((2, 3)) < v.shapes.sum((2, 3)))).sum()) for v in videos)
    assert occluded == summary["occluded_masks"]
    assert not any((v.visible & ~v.shapes).any() for v in videos)


def test_default_dataset_is_fast_and_varied(tmp_path):
    s = generate_synthetic(tmp_path / "default", SynthConfig())
    assert s["null_masks"] > 0 and s["occluded_masks"] > 0
    assert sum(n > 0 for n in s["instances_per_category"].values()) >= 4
    assert all(n > 0 for n in s["defects"].values())


def test_config_validation():
    with pytest.raises(ValidationError, match="min_objects"):
        SynthConfig(min_objects=4, max_objects=2)
    for bad in ({"videos": 0}, {"height": 16}, {"missing_rate": 1.5}, {"nope": 1}):
        with pytest.raises(ValidationError):
            SynthConfig(**bad)


def test_existing_dir_and_failure_leave_no_trace(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    with pytest.raises(PmvisError, match="not empty"):
        generate_synthetic(d, SynthConfig(videos=1, frames=2, height=32, width=32))
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and (d / "keep.txt").read_text() == "mine"

    def boom(config, video_index):
        raise RuntimeError("boom")

    monkeypatch.setattr(synthetic, "render_video", boom)
    with pytest.raises(RuntimeError):
        generate_synthetic(d, SynthConfig(videos=1, frames=2), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and (d / "keep.txt").read_text() == "mine"
    monkeypatch.undo()
    generate_synthetic(d, SynthConfig(videos=1, frames=2, height=32, width=40), overwrite=True)
    assert not (d / "keep.txt").exists() and (d / "annotations.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.fixture
def synth_only_cli(monkeypatch):
    """Build the CLI with only `synth`: these tests must not depend on the other jobs' modules."""
    monkeypatch.setattr(cli, "COMMANDS", {"synth": "synth"})


def test_cli(tmp_path, capsys, synth_only_cli):
    d = tmp_path / "cli"
    args = ["synth", "--out", str(d), "--videos", "2", "--frames", "4", "--size", "64", "80"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "2 videos" in out and str(d) in out
    truth = _load(d, "truth.json")
    assert len(truth["videos"]) == 2 and truth["videos"][0]["length"] == 4
    assert (truth["videos"][0]["height"], truth["videos"][0]["width"]) == (64, 80)
    before = _files(d)
    assert cli.main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert _files(d) == before
    assert cli.main(args + ["--seed", "3", "--overwrite"]) == 0
    assert _files(d) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


def test_cli_config_file_and_flag_precedence(tmp_path, synth_only_cli):
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("videos: 1\nframes: 3\nheight: 48\nwidth: 48\nmissing_rate: 0.0\n")
    d = tmp_path / "cfg"
    assert cli.main(["synth", "--out", str(d), "--config", str(cfg), "--frames", "2"]) == 0
    truth = _load(d, "truth.json")
    assert len(truth["videos"]) == 1 and truth["videos"][0]["length"] == 2
    assert truth["info"]["config"]["missing_rate"] == 0.0 and truth["videos"][0]["width"] == 48


def test_cli_bad_value(tmp_path, capsys, synth_only_cli):
    d = tmp_path / "bad"
    assert cli.main(["synth", "--out", str(d), "--videos", "0"]) == 2
    err = capsys.readouterr().err
    assert "videos" in err and "greater than or equal to 1" in err
    assert list(tmp_path.iterdir()) == []
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("vidoes: 3\n")
    assert cli.main(["synth", "--out", str(d), "--config", str(cfg)]) == 2
    assert "vidoes" in capsys.readouterr().err and not d.exists()
