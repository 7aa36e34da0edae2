"""The YTVIS data layer: encodings normalised, every malformed case rejected with its place."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
from conftest import rect, rle
from pycocotools import mask as mask_utils

from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask
from pmvis.platform.data.results_io import load_results, parse_results
from pmvis.platform.data.ytvis_io import load_ytvis, parse_ytvis, save_ytvis


def test_three_encodings_normalise_to_the_same_mask(tiny_ytvis):
    truth = rect(20, 30, 2, 6, 3, 8)
    poly = [[3, 2, 8, 2, 8, 6, 3, 6]]  # pycocotools rasterises a polygon's pixel-corner outline
    uncompressed = mask_utils.frPyObjects([poly[0]], 20, 30)[0]
    uncompressed_counts = {"size": [20, 30], "counts": _uncompressed_counts(truth)}
    for seg in (rle(truth), uncompressed_counts, poly):
        data = copy.deepcopy(tiny_ytvis)
        data["annotations"][0]["segmentations"][0] = seg
        ds = parse_ytvis(data)
        out = ds.annotations[0].segmentations[0]
        assert isinstance(out["counts"], str) and out["size"] == [20, 30]
        if seg is poly:
            assert np.array_equal(decode_mask(out), mask_utils.decode(uncompressed).astype(bool))
        else:
            assert np.array_equal(decode_mask(out), truth)
    assert ds.annotations[0].segmentations[1] is None


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


def test_boxes_and_areas_derived_when_absent(tiny_ytvis):
    ann = tiny_ytvis["annotations"][0]
    del ann["bboxes"], ann["areas"]
    a = parse_ytvis(tiny_ytvis).annotations[0]
    assert a.bboxes == [[3.0, 2.0, 5.0, 4.0], None]
    assert a.areas == [20.0, None]


def test_box_only_annotations_are_accepted(tiny_ytvis):
    """Box-supervised users have boxes and no masks at all."""
    del tiny_ytvis["annotations"][0]["segmentations"]
    a = parse_ytvis(tiny_ytvis).annotations[0]
    assert a.segmentations == [None, None] and a.bboxes[0] == [3.0, 2.0, 5.0, 4.0]


def _mutations():
    """(name, mutate(data), expected fragments of the error message)."""
    def seg0(d):
        return d["annotations"][0]["segmentations"]

    return [
        ("length mismatch", lambda d: seg0(d).append(None),
         ["annotation id=1 (video id=1)", "'segmentations' has 3 entries", "2 frames"]),
        ("box outside", lambda d: d["annotations"][0]["bboxes"].__setitem__(0, [25.0, 2.0, 10.0, 4.0]),
         ["annotation id=1 (video id=1), frame 0", "outside the 30x20 image"]),
        ("negative box", lambda d: d["annotations"][0]["bboxes"].__setitem__(0, [3.0, 2.0, -1.0, 4.0]),
         ["frame 0", "negative"]),
        ("bad box type", lambda d: d["annotations"][0]["bboxes"].__setitem__(0, [1, 2, 3]),
         ["frame 0", "[x, y, w, h]"]),
        ("duplicate annotation id", lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])),
         ["annotation id=1", "duplicate"]),
        ("duplicate video id", lambda d: d["videos"].append(copy.deepcopy(d["videos"][0])),
         ["video id=1", "duplicate"]),
        ("unknown video", lambda d: d["annotations"][0].__setitem__("video_id", 7),
         ["annotation id=1 (video id=7)", "not a video"]),
        ("unknown category", lambda d: d["annotations"][0].__setitem__("category_id", 9),
         ["annotation id=1", "category_id"]),
        ("rle wrong size", lambda d: seg0(d).__setitem__(0, rle(np.zeros((10, 30), bool))),
         ["frame 0", "does not match"]),
        ("rle corrupt string", lambda d: seg0(d).__setitem__(0, {"size": [20, 30], "counts": "zz~~"}),
         ["frame 0", "RLE"]),
        ("rle short string", lambda d: seg0(d).__setitem__(0, {"size": [20, 30], "counts": "1"}),
         ["frame 0", "covers 1 pixels, expected 600"]),
        ("uncompressed wrong total", lambda d: seg0(d).__setitem__(0, {"size": [20, 30], "counts": [5, 5]}),
         ["frame 0", "sum to 10"]),
        ("bad polygon", lambda d: seg0(d).__setitem__(0, [[1, 2, 3]]), ["frame 0", "polygon"]),
        ("segmentation type", lambda d: seg0(d).__setitem__(0, "mask"), ["frame 0", "segmentation must be"]),
        ("absolute file name", lambda d: d["videos"][0]["file_names"].__setitem__(1, "/etc/passwd"),
         ["video id=1, frame 1", "absolute"]),
        ("escaping file name", lambda d: d["videos"][0]["file_names"].__setitem__(0, "../../x.jpg"),
         ["video id=1, frame 0", ".."]),
        ("empty video", lambda d: d["videos"][0].__setitem__("file_names", []), ["video id=1", "no frames"]),
        ("length field wrong", lambda d: d["videos"][0].__setitem__("length", 5), ["video id=1", "'length' is 5"]),
        ("bad size", lambda d: d["videos"][0].__setitem__("width", 0), ["video id=1", "positive integers"]),
        ("missing key", lambda d: d.pop("categories"), ["missing top-level key 'categories'"]),
        ("absent everywhere", lambda d: d["annotations"][0].update(
            segmentations=[None, None], bboxes=[None, None], areas=[None, None]), ["absent from every frame"]),
        ("negative area", lambda d: d["annotations"][0]["areas"].__setitem__(0, -3), ["frame 0", "area"]),
    ]


@pytest.mark.parametrize("name,mutate,fragments", _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_files_are_rejected_with_their_place(tiny_ytvis, tmp_path, name, mutate, fragments):
    mutate(tiny_ytvis)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(tiny_ytvis))
    with pytest.raises(PmvisError) as e:
        load_ytvis(path)
    msg = str(e.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"videos": [\n  {"id": 1,, }]}')
    with pytest.raises(PmvisError, match=r"broken.json: malformed JSON at line 2"):
        load_ytvis(path)


def test_missing_file(tmp_path):
    with pytest.raises(PmvisError, match="file not found"):
        load_ytvis(tmp_path / "nope.json")


def test_several_problems_reported_at_once(tiny_ytvis):
    tiny_ytvis["annotations"][0]["bboxes"][0] = [100, 100, 5, 5]
    tiny_ytvis["annotations"][0]["segmentations"][0] = "bad"
    with pytest.raises(PmvisError, match="2 problem"):
        parse_ytvis(tiny_ytvis)


def test_round_trip_and_atomic_save(tiny_ytvis, tmp_path):
    ds = parse_ytvis(tiny_ytvis)
    out = tmp_path / "sub" / "saved.json"
    save_ytvis(ds, out)
    again = load_ytvis(out)
    assert again.annotations[0].segmentations == ds.annotations[0].segmentations
    assert [p.name for p in out.parent.iterdir()] == ["saved.json"]  # no temp file left behind


def test_failed_save_keeps_the_old_file(tiny_ytvis, tmp_path):
    ds = parse_ytvis(tiny_ytvis)
    out = tmp_path / "saved.json"
    save_ytvis(ds, out)
    before = out.read_bytes()
    ds.info = {"unserialisable": object()}
    with pytest.raises(TypeError):
        save_ytvis(ds, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved.json"]


def test_read_frames_missing_corrupt_and_wrong_size(tiny_ytvis, tmp_path):
    (tmp_path / "JPEGImages" / "v1").mkdir(parents=True)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(tiny_ytvis))
    cv2.imwrite(str(tmp_path / "JPEGImages/v1/00000.jpg"), np.full((20, 30, 3), 128, np.uint8))
    with pytest.raises(PmvisError, match=r"video id=1, frame 1: frame file .* is missing"):
        load_ytvis(path, check_frames=True)
    ds = load_ytvis(path)
    assert ds.read_frame(1, 0).shape == (20, 30, 3)
    (tmp_path / "JPEGImages/v1/00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PmvisError, match=r"video id=1, frame 1 .*cannot decode"):
        ds.read_frame(1, 1)
    cv2.imwrite(str(tmp_path / "JPEGImages/v1/00001.jpg"), np.zeros((10, 30, 3), np.uint8))
    with pytest.raises(PmvisError, match=r"video id=1, frame 1 .*30x10.*30x20"):
        ds.read_video(1)


def test_results_validation(tiny_ytvis, tmp_path):
    gt = parse_ytvis(tiny_ytvis)
    good = [{"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": [rle(rect(20, 30, 0, 3, 0, 3)), None]}]
    assert parse_results(good, gt)[0].score == 0.5
    assert parse_results([], gt) == []
    cases = [
        ({**good[0], "video_id": 2}, "video id is not in the ground truth"),
        ({**good[0], "category_id": 3}, "category_id 3"),
        ({**good[0], "score": "high"}, "'score'"),
        ({**good[0], "segmentations": [None]}, "must list 2 frames"),
        ({**good[0], "segmentations": [rle(np.zeros((5, 5), bool)), None]}, "frame 0"),
    ]
    for bad, fragment in cases:
        path = tmp_path / "res.json"
        path.write_text(json.dumps([bad]))
        with pytest.raises(PmvisError) as e:
            load_results(path, gt)
        assert fragment in str(e.value) and str(path) in str(e.value)
