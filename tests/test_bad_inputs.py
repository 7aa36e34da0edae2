"""Hostile or broken inputs (issue 14): each is a PmvisError naming its place, never a crash,
a hang, unbounded memory or a silently wrong result. No Ray, no models: plain function calls."""

from __future__ import annotations

import json
import os
import stat
import time

import cv2
import numpy as np
import pytest
from conftest import rect, rle

from pmvis.core.config import StrictConfig, load_config, parse_yaml_mapping
from pmvis.core.errors import PmvisError
from pmvis.core.io import write_json_atomic, write_text_atomic
from pmvis.platform.data.coco import coco_to_ytvis
from pmvis.platform.data.results_io import load_results, parse_results
from pmvis.platform.data.ytvis import MAX_IMAGE_SIDE_PX
from pmvis.platform.data.ytvis_io import check_output_for_dataset, load_dataset_dir, load_ytvis, parse_ytvis
from pmvis.platform.pseudo.store import RawMasks, read_raw, rows_from_raw_masks, stored_sources, write_video_rows


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _rejected(path, *fragments, loader=load_ytvis):
    with pytest.raises(PmvisError) as e:
        loader(path)
    msg = str(e.value)
    for frag in (str(path), *fragments):
        assert frag in msg, f"{frag!r} not in {msg!r}"


# ----------------------------------------------------------------------------- 1. geometry bounds


def test_polygon_far_outside_the_image_is_rejected_before_rasterising(tiny_ytvis, tmp_path):
    # 1e9 segfaults pycocotools (6e300 grew a process to 23 GB); 1e5 shows the bound without risk.
    tiny_ytvis["annotations"][0]["segmentations"][0] = [[0, 0, 1e5, 0, 1e5, 10, 0, 10]]
    _rejected(_write(tmp_path, tiny_ytvis), "annotation id=1 (video id=1), frame 0", "outside the 30x20 image")


def test_polygon_within_tolerance_is_accepted(tiny_ytvis):
    tiny_ytvis["annotations"][0]["segmentations"][0] = [[-0.5, -0.5, 30.5, -0.5, 30.5, 20.5]]
    assert parse_ytvis(tiny_ytvis).annotations[0].segmentations[0]["size"] == [20, 30]


def test_frame_size_beyond_the_bound_is_rejected(tiny_ytvis, tmp_path):
    tiny_ytvis["videos"][0]["width"] = MAX_IMAGE_SIDE_PX + 1
    _rejected(_write(tmp_path, tiny_ytvis), "video id=1", "largest supported side")


@pytest.mark.parametrize("key,index,value", [
    ("bboxes", 0, [10 ** 400, 0, 1, 1]),  # beyond float range: OverflowError before
    ("areas", 0, 10 ** 400),
])
def test_integers_beyond_float_range_are_rejected(tiny_ytvis, tmp_path, key, index, value):
    tiny_ytvis["annotations"][0][key][index] = value
    _rejected(_write(tmp_path, tiny_ytvis), "annotation id=1 (video id=1), frame 0")


# ----------------------------------------------------------------------------- 2. frames


def _dataset_dir(tmp_path, data):
    (tmp_path / "JPEGImages" / "v1").mkdir(parents=True)
    _write(tmp_path, data, "annotations.json")
    for name in data["videos"][0]["file_names"]:
        if "\udcff" not in name:
            cv2.imwrite(str(tmp_path / "JPEGImages" / name), np.full((20, 30, 3), 99, np.uint8))
    return tmp_path


def test_frame_name_that_is_not_unicode_is_rejected_at_load(tiny_ytvis, tmp_path):
    # JSON "\udcff" (a byte that was not UTF-8) made cv2.imread segfault when the frame was read.
    tiny_ytvis["videos"][0]["file_names"][1] = "v1/\udcff.jpg"
    _rejected(_write(tmp_path, tiny_ytvis), "video id=1, frame 1", "not valid Unicode")


def test_truncated_jpeg_is_an_error_naming_the_frame(tiny_ytvis, tmp_path):
    ds = load_dataset_dir(_dataset_dir(tmp_path, tiny_ytvis))
    f = tmp_path / "JPEGImages/v1/00001.jpg"
    ok, jpg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    f.write_bytes(jpg.tobytes()[: len(jpg) * 2 // 3])
    with pytest.raises(PmvisError, match=r"annotations.json: video id=1, frame 1 .*00001.jpg.*truncated JPEG"):
        ds.read_frame(1, 1)
    assert ds.read_frame(1, 0).shape == (20, 30, 3)


def test_symlink_out_of_the_frames_root_is_refused(tiny_ytvis, tmp_path):
    root = _dataset_dir(tmp_path / "data", tiny_ytvis)
    outside = tmp_path / "secret.jpg"
    cv2.imwrite(str(outside), np.zeros((20, 30, 3), np.uint8))
    (root / "JPEGImages/v1/00001.jpg").unlink()
    (root / "JPEGImages/v1/00001.jpg").symlink_to(outside)
    ds = load_dataset_dir(root)
    with pytest.raises(PmvisError, match=r"video id=1, frame 1: .*outside the frames root"):
        ds.read_frame(1, 1)
    with pytest.raises(PmvisError, match=r"video id=1, frame 1: .*outside the frames root"):
        load_dataset_dir(root, check_frames=True)
    # a link that stays inside, and a frames root that is itself a link, are fine
    (root / "JPEGImages/v1/00001.jpg").unlink()
    (root / "JPEGImages/v1/00001.jpg").symlink_to(root / "JPEGImages/v1/00000.jpg")
    assert load_dataset_dir(root, check_frames=True).read_frame(1, 1).shape == (20, 30, 3)


# ----------------------------------------------------------------------------- 3. raw store


def _store(tmp_path, counts, confidence=0.9, source="hqsam"):
    track = RawMasks(video_id=1, annotation_id=1, source=source,
                     segmentations=[{"size": [20, 30], "counts": counts}, None], confidences=[confidence, None])
    write_video_rows(tmp_path, source, 1, rows_from_raw_masks([track], 20, 30))
    return tmp_path


def test_corrupt_rle_in_the_raw_store_is_an_error_not_a_hang(tmp_path):
    good = rle(rect(20, 30, 2, 6, 3, 8))["counts"]
    for counts, fragment in ((good[: len(good) // 2], "mask RLE"), ("zz~~", "malformed"), ("1", "covers 1 pixels")):
        raw = _store(tmp_path / str(len(counts)), counts)
        with pytest.raises(PmvisError) as e:
            read_raw(raw)
        msg = str(e.value)
        for frag in ("video_00000001.parquet", "video id=1, annotation id=1, frame 0", fragment):
            assert frag in msg, msg
    assert len(read_raw(_store(tmp_path / "ok", good))) == 1


def test_infinite_confidence_in_the_raw_store_is_an_error(tmp_path):
    with pytest.raises(PmvisError, match=r"video id=1, annotation id=1, frame 0: confidence inf is infinite"):
        read_raw(_store(tmp_path, rle(rect(20, 30, 2, 6, 3, 8))["counts"], confidence=float("inf")))


def test_stray_files_in_the_raw_store_are_ignored(tmp_path):
    raw = _store(tmp_path, rle(rect(20, 30, 2, 6, 3, 8))["counts"])
    (raw / "notes.txt").write_text("x")
    (raw / "hqsam").mkdir()
    (raw / "hqsam/abc.parquet").write_text("x")
    (raw / "source=hqsam/video_abc.parquet").write_text("x")
    (raw / "source=hqsam/notes.parquet").write_text("x")
    (raw / "source=other").mkdir()
    (raw / "source=other/video_00000002.parquet").mkdir()
    assert [t.annotation_id for t in read_raw(raw)] == [1]
    assert stored_sources(raw) == ["hqsam"]


# ----------------------------------------------------------------------------- 4. decode errors


def test_non_utf8_json_and_yaml_name_the_file(tiny_ytvis, tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(json.dumps(tiny_ytvis).encode().replace(b'"thing"', b'"th\xffing"'))
    _rejected(path, "not UTF-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"a: \xff\n")
    with pytest.raises(PmvisError, match=r"c.yaml: not UTF-8"):
        load_config(StrictConfig, cfg)


def test_json_number_python_refuses_names_the_file(tiny_ytvis, tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(tiny_ytvis).replace('"iscrowd": 0', '"iscrowd": ' + "1" * 5000))
    _rejected(path, "malformed JSON")


def test_unhashable_category_ids_are_rejected(tiny_ytvis, tmp_path):
    gt = parse_ytvis(tiny_ytvis)
    tiny_ytvis["annotations"][0]["category_id"] = [1]
    _rejected(_write(tmp_path, tiny_ytvis), "annotation id=1", "'category_id' [1]")
    good = {"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": [None, None]}
    for bad, fragment in (({**good, "category_id": {"a": 1}}, "category_id {'a': 1}"),
                          ({**good, "score": 10 ** 400}, "'score' must be a finite number")):
        res = _write(tmp_path, [bad], "res.json")
        _rejected(res, "results[0] (video id=1)", fragment, loader=lambda p: load_results(p, gt))
    assert parse_results([good], gt)[0].score == 0.5


def test_coco_unhashable_and_overflowing_values_are_rejected():
    coco = {"images": [{"id": 1, "width": 30, "height": 20, "file_name": "a.jpg"}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": [1], "bbox": [1, 1, 2, 2]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10 ** 400, 1, 2, 2]}]}
    with pytest.raises(PmvisError) as e:
        coco_to_ytvis(coco, source="c.json")
    assert "annotation id=1 (image id=1): 'category_id' [1]" in str(e.value)
    assert "annotation id=2 (image id=1): 'bbox' must be [x, y, w, h] of 4 finite numbers" in str(e.value)


def test_yaml_aliases_are_refused_quickly():
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    start = time.perf_counter()
    with pytest.raises(PmvisError, match=r"bomb.yaml: .*aliases"):
        parse_yaml_mapping("\n".join(lines), "bomb.yaml")
    assert time.perf_counter() - start < 1.0
    assert parse_yaml_mapping("a: &x 1\nb: 2\n", "anchor-only.yaml") == {"a": 1, "b": 2}


# ----------------------------------------------------------------------------- 5, 6. outputs


def test_json_output_refuses_infinity_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "o.json"
    write_json_atomic(out, {"score": 1.0})
    with pytest.raises(ValueError, match=r"o.json: not written"):
        write_json_atomic(out, {"score": float("inf")})
    assert json.loads(out.read_text()) == {"score": 1.0}


def test_atomic_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        os.umask(0o077)
        write_text_atomic(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- 7. --out


def test_out_may_not_overwrite_dataset_files_or_be_unwritable(tiny_ytvis, tmp_path):
    root = _dataset_dir(tmp_path / "data", tiny_ytvis)
    _write(root, tiny_ytvis, "truth.json")
    ds = load_dataset_dir(root)
    (tmp_path / "afile").write_text("x")
    (root / "link.json").symlink_to(root / "annotations.json")
    cases = [
        (root / "truth.json", "would overwrite the input file"),
        (root / "link.json", "would overwrite the input file"),
        (root / "defects.json", "would overwrite the input file"),  # not there yet: still the dataset's
        (root / "JPEGImages/v1/x.json", "inside the input directory"),
        (tmp_path, "is a directory"),
        (tmp_path / "afile/out.json", "is not a directory"),
    ]
    for out, fragment in cases:
        with pytest.raises(PmvisError, match=fragment):
            check_output_for_dataset(out, ds)
    check_output_for_dataset(root / "train_pseudo.json", ds)
    check_output_for_dataset(tmp_path / "new/dir/out.json", ds)


def test_command_line_values_and_other_json_inputs_are_checked_like_files(tmp_path):
    from pmvis.core.config import parse_dotlist
    from pmvis.jobs.pseudo_masks import parse_options
    from pmvis.platform.data.synthetic import write_coco_stills
    from pmvis.platform.pseudo.plan import read_manifest

    with pytest.raises(PmvisError, match=r"--set .*aliases"):
        parse_dotlist(["a=[&x 1, *x]"])
    with pytest.raises(PmvisError, match=r"--option .*aliases"):
        parse_options(["grabcut.iterations=[&x 1, *x]"])
    (tmp_path / "manifest.json").write_bytes(b'{"sources": "\xff"}')
    with pytest.raises(PmvisError, match=r"manifest.json: not UTF-8.*delete the manifest"):
        read_manifest(tmp_path)
    (tmp_path / "truth.json").write_bytes(b"{")
    with pytest.raises(PmvisError, match=r"truth.json: malformed JSON"):
        write_coco_stills(tmp_path)


def test_resume_counts_only_real_video_files_as_done(tmp_path):
    from pmvis.platform.pseudo.store import done_videos, raw_file

    write_video_rows(tmp_path, "grabcut", 3, rows_from_raw_masks([], 4, 4))
    raw_file(tmp_path, "grabcut", 5).mkdir()  # a folder named like a video file
    (raw_file(tmp_path, "grabcut", 0).parent / "video_abc.parquet").write_bytes(b"")
    assert done_videos(tmp_path, "grabcut") == {3} and done_videos(tmp_path, "other") == set()
