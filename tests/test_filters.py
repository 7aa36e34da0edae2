"""PM-VIS ground-truth filters: RIA and Missing-Data, and `pmvis filter` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pmvis.cli import main
from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask, encode_mask
from pmvis.models.fusion import FuseConfig
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis import Annotation, Video, YTVISDataset
from pmvis.platform.data.ytvis_io import load_ytvis
from pmvis.platform.pseudo.filters import FilterConfig, filter_annotations
from pmvis.platform.pseudo.store import RawMasks, rows_from_raw_masks, write_video_rows

H, W = 12, 16


def rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def track(aid: int, source: str, masks: list, confs: list, vid: int = 1) -> RawMasks:
    return RawMasks(video_id=vid, annotation_id=aid, source=source,
                    segmentations=[None if m is None else encode_mask(m) for m in masks],
                    confidences=list(confs))


def gt_dataset(masks: list) -> YTVISDataset:
    """One video, one annotation whose frames are the given masks (None: a fully null entry)."""
    T = len(masks)
    segs = [None if m is None else encode_mask(m) for m in masks]
    boxes, areas = [], []
    for m in masks:
        if m is None:
            boxes.append(None)
            areas.append(None)
        else:
            ys, xs = np.nonzero(m)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                          float(ys.max() - ys.min() + 1)])
            areas.append(int(m.sum()))
    video = Video(id=1, width=W, height=H, file_names=[f"v/{t:05d}.jpg" for t in range(T)])
    ann = Annotation(id=5, video_id=1, category_id=1, segmentations=segs, bboxes=boxes, areas=areas)
    return YTVISDataset(videos={1: video}, annotations=[ann], categories={1: "thing"})


GT = rect(2, 4, 3, 8)  # 10 px, box [3, 2, 5, 2]


def iou_07() -> np.ndarray:
    """7 of GT's 10 pixels: IoU exactly 0.7."""
    m = rect(2, 3, 3, 8)
    m[3, 3:5] = True
    return m


def ria_case():
    # Frame IoUs with the pseudo mask: 1.0, 0.7, 0.5, (no pseudo mask), (null GT entry).
    gt = gt_dataset([GT, GT, GT, GT, None])
    half = np.zeros((H, W), bool)
    half[2, 3:8] = True  # 5 px subset: IoU 0.5
    tracks = [track(5, "hqsam", [GT, iou_07(), half, None, None], [0.9, 0.9, 0.9, None, None])]
    return gt, tracks


def test_config_defaults_and_validation():
    cfg = FilterConfig()
    assert cfg.ria and cfg.ria_tau == 0.7 and cfg.missing and cfg.missing_sources == ["track"]
    assert cfg.missing_min_confidence == 0.8 and cfg.missing_min_area == 16 and cfg.missing_action == "drop"
    assert cfg.fuse == FuseConfig()
    for values, field in [({"ria_tau": 1.5}, "ria_tau"), ({"missing_min_area": -1}, "missing_min_area"),
                          ({"missing_action": "erase"}, "missing_action"), ({"missing_sources": []}, "missing_sources"),
                          ({"fuse": {"vote_threshold": 0}}, r"fuse\.vote_threshold"),
                          ({"missing_min_confidence": 2}, "missing_min_confidence")]:
        with pytest.raises(PmvisError, match=field):
            build_config(FilterConfig, values)


def test_ria_drops_exactly_the_masks_below_tau_and_keeps_boxes():
    gt, tracks = ria_case()
    cfg = FilterConfig(missing=False)  # tau 0.7: IoU 0.7 is kept
    clean, report = filter_annotations(gt, tracks, cfg)
    a, g = clean.annotations[0], gt.annotations[0]
    assert [r["frame"] for r in report] == [2]
    r = report[0]
    assert (r["video_id"], r["annotation_id"], r["kind"]) == (1, 5, "inaccurate")
    assert r["iou"] == pytest.approx(0.5) and r["pseudo_source"] == "hqsam" and "0.500" in r["reason"]
    assert a.segmentations[2] is None and a.areas[2] is None and a.bboxes[2] == g.bboxes[2]
    assert a.segmentations[:2] == g.segmentations[:2] and a.segmentations[3] == g.segmentations[3]
    assert a.areas[3] == 10  # no pseudo mask on frame 3: left alone
    assert clean.info["filter"]["counts"]["ria_checked"] == 3
    assert clean.info["filter"]["counts"]["ria_no_fused_mask"] == 1
    # Just above the boundary the IoU-0.7 frame goes too.
    clean, report = filter_annotations(gt, tracks, cfg.model_copy(update={"ria_tau": 0.71}))
    assert [r["frame"] for r in report] == [1, 2]
    assert report[0]["iou"] == 0.7
    # The input is untouched; RIA off reports nothing.
    assert gt.annotations[0].segmentations[2] is not None
    assert filter_annotations(gt, tracks, FilterConfig(ria=False, missing=False))[1] == []


def test_ria_compares_with_the_fused_mask():
    gt = gt_dataset([GT])
    # hqsam (IoU 0.5 with GT; quality 0.4 × 0.5 = 0.2) is below its SCM threshold, so grabcut's
    # exact mask (quality 0.5 × 0.3 = 0.15) is the fused one; without SCM hqsam wins.
    half = np.zeros((H, W), bool)
    half[2, 3:8] = True
    tracks = [track(5, "hqsam", [half], [0.4]), track(5, "grabcut", [GT], [0.3])]
    assert filter_annotations(gt, tracks, FilterConfig(missing=False))[1] == []
    cfg = FilterConfig(missing=False, fuse=FuseConfig(scm_thresholds={}))
    _, report = filter_annotations(gt, tracks, cfg)
    assert [(r["frame"], r["pseudo_source"]) for r in report] == [(0, "hqsam")]


def missing_case():
    # GT visible on frame 0; null on frames 1-6.
    gt = gt_dataset([GT, None, None, None, None, None, None])
    big, small16, small15 = rect(3, 8, 4, 8), rect(3, 7, 4, 8), rect(3, 8, 4, 7)  # 20, 16, 15 px
    tracks = [
        track(5, "track", [GT, big, big, small16, small15, big, None], [0.9, 0.9, 0.79, 0.8, 0.99, 0.8, None]),
        # hqsam is not a missing source by default: its confident frame-6 mask is ignored.
        track(5, "hqsam", [GT, None, None, None, None, None, big], [0.9, None, None, None, None, None, 0.99]),
    ]
    return gt, tracks


def test_missing_data_drop():
    gt, tracks = missing_case()
    clean, report = filter_annotations(gt, tracks, FilterConfig(ria=False))
    # frame 1: ok; 2: confidence 0.79 < 0.8; 3: area 16 and confidence 0.8 (both boundaries) ok;
    # 4: area 15 < 16; 5: ok; 6: only hqsam.
    assert [r["frame"] for r in report] == [1, 3, 5]
    assert all(r["kind"] == "missing" and r["source"] == "track" and r["action"] == "drop" for r in report)
    assert [r["area"] for r in report] == [20, 16, 20] and [r["confidence"] for r in report] == [0.9, 0.8, 0.8]
    a = clean.annotations[0]
    assert a.extra["excluded_frames"] == [1, 3, 5]
    assert a.segmentations[1:] == [None] * 6 and a.bboxes[1:] == [None] * 6
    # Thresholds are knobs.
    _, report = filter_annotations(gt, tracks, FilterConfig(ria=False, missing_min_confidence=0.95,
                                                            missing_min_area=0))
    assert [r["frame"] for r in report] == [4]
    _, report = filter_annotations(gt, tracks, FilterConfig(ria=False, missing_sources=["track", "hqsam"]))
    assert [r["frame"] for r in report] == [1, 3, 5, 6] and report[-1]["source"] == "hqsam"


def test_missing_data_fill():
    gt, tracks = missing_case()
    clean, report = filter_annotations(gt, tracks, FilterConfig(ria=False, missing_action="fill"))
    assert [r["frame"] for r in report] == [1, 3, 5]
    a = clean.annotations[0]
    assert np.array_equal(decode_mask(a.segmentations[1]), rect(3, 8, 4, 8))
    assert a.bboxes[1] == [4.0, 3.0, 4.0, 5.0] and a.areas[1] == 20
    assert a.bboxes[3] == [4.0, 3.0, 4.0, 4.0] and a.areas[3] == 16
    assert a.segmentations[2] is None and a.segmentations[4] is None
    assert a.extra["filled_frames"] == [1, 3, 5] and "excluded_frames" not in a.extra


def test_filter_errors():
    gt, tracks = missing_case()
    with pytest.raises(PmvisError, match=r"\['boxinst'\] not in the raw pseudo-mask store"):
        filter_annotations(gt, tracks, FilterConfig(missing_sources=["boxinst"]))
    with pytest.raises(PmvisError, match=r"\['sam'\]"):
        filter_annotations(gt, tracks, FilterConfig(fuse=FuseConfig(sources=["sam"])))
    with pytest.raises(PmvisError, match=r"annotation id\(s\) 6 "):
        filter_annotations(gt, tracks + [track(6, "track", [None] * 7, [None] * 7)], FilterConfig())


# ----------------------------------------------------------------------------- `pmvis filter`


def make_store(tmp_path):
    """A tiny synthetic dataset with defects; hqsam = truth on the user file's box frames (0.9),
    track = truth on every visible frame (0.85), grabcut = the filled truth box (0.6)."""
    data = tmp_path / "data"
    generate_synthetic(data, SynthConfig(videos=2, frames=4, height=48, width=64,
                                         inaccurate_rate=0.3, missing_rate=0.2))
    truth = load_ytvis(data / "truth.json")
    user = {a.id: a for a in load_ytvis(data / "annotations.json").annotations}
    raw = tmp_path / "pm" / "raw"
    for vid, anns in truth.annotations_by_video().items():
        v = truth.videos[vid]
        per_source = {"hqsam": [], "track": [], "grabcut": []}
        for a in anns:
            tm = [None if s is None else decode_mask(s) for s in a.segmentations]
            hq = [m if user[a.id].bboxes[t] is not None else None for t, m in enumerate(tm)]
            boxes = []
            for t, m in enumerate(tm):
                x, y, w, h = (0, 0, 0, 0) if m is None else (int(b) for b in a.bboxes[t])
                boxes.append(None if m is None else rect(y, y + h, x, x + w, v.height, v.width))
            for name, ms, c in (("hqsam", hq, 0.9), ("track", tm, 0.85), ("grabcut", boxes, 0.6)):
                per_source[name].append(track(a.id, name, ms, [None if m is None else c for m in ms], vid))
        for source, tracks in per_source.items():
            write_video_rows(raw, source, vid, rows_from_raw_masks(tracks, v.height, v.width))
    return data, tmp_path / "pm"


def key(r: dict) -> tuple:
    return (r["video_id"], r["annotation_id"], r["frame"], r["kind"])


def test_filter_cli_finds_the_injected_defects(tmp_path, capsys):
    data, pm = make_store(tmp_path)
    defects = json.loads((data / "defects.json").read_text())
    assert {d["kind"] for d in defects} == {"inaccurate", "missing"}
    conf = tmp_path / "filter.yaml"
    # Injected inaccurate masks have IoU <= 0.9 with the truth; the fused masks are the truth.
    conf.write_text("ria_tau: 0.95\n")
    out = tmp_path / "clean.json"
    assert main(["filter", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(out), "--config", str(conf)]) == 0
    text = capsys.readouterr().out
    n_inacc = sum(d["kind"] == "inaccurate" for d in defects)
    n_miss = len(defects) - n_inacc
    assert f"{n_inacc} inaccurate, {n_miss} missing" in text
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert sorted(map(key, report)) == sorted(map(key, defects))  # precision = recall = 1
    clean = load_ytvis(out)
    user = {a.id: a for a in load_ytvis(data / "annotations.json").annotations}
    for r in report:
        a = next(a for a in clean.annotations if a.id == r["annotation_id"])
        if r["kind"] == "inaccurate":
            assert a.segmentations[r["frame"]] is None and a.bboxes[r["frame"]] == user[a.id].bboxes[r["frame"]]
        else:
            assert r["frame"] in a.extra["excluded_frames"]
    written = yaml.safe_load((tmp_path / "clean.config.yaml").read_text())
    assert build_config(FilterConfig, written) == FilterConfig(ria_tau=0.95)


def test_filter_cli_fill_and_report_path(tmp_path, capsys):
    data, pm = make_store(tmp_path)
    conf = tmp_path / "filter.yaml"
    conf.write_text("ria: false\nmissing_action: fill\n")
    out, rep = tmp_path / "clean.json", tmp_path / "r" / "defects_found.json"
    rc = main(["filter", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(out), "--config", str(conf),
               "--report", str(rep)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    truth = {a.id: a for a in load_ytvis(data / "truth.json").annotations}
    clean = {a.id: a for a in load_ytvis(out).annotations}
    assert report and all(r["kind"] == "missing" for r in report)
    for r in report:
        a, t = clean[r["annotation_id"]], r["frame"]
        assert a.segmentations[t] == truth[a.id].segmentations[t] and a.bboxes[t] == truth[a.id].bboxes[t]
    assert not (tmp_path / "clean.report.json").exists()


@pytest.mark.parametrize("config_text, message", [
    ("ria_tau: 1.5\n", "ria_tau"),
    ("missing_sources: [boxinst]\n", "['boxinst'] not in the raw pseudo-mask store"),
    ("fuse: {mode: median}\n", "fuse.mode"),
])
def test_filter_cli_bad_config_exits_2_without_output(tmp_path, capsys, config_text, message):
    data, pm = make_store(tmp_path)
    conf = tmp_path / "filter.yaml"
    conf.write_text(config_text)
    out = tmp_path / "clean.json"
    assert main(["filter", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(out), "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "pmvis filter: error:" in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "filter.yaml", "pm"]
