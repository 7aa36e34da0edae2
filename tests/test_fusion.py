"""PM-VIS fusion: DOOB, SCM, box tightness, SHQM select, weighted vote, fuse_annotations, `pmvis fuse`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pmvis.cli import main
from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask, encode_mask
from pmvis.models.fusion import (
    FuseConfig,
    box_tightness,
    doob,
    doob_window,
    fuse_frame,
    scm_keep,
    select_mask,
    vote_masks,
)
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis import Annotation, Video, YTVISDataset
from pmvis.platform.data.ytvis_io import load_ytvis
from pmvis.platform.pseudo.fuse import fuse_annotations, fuse_with_stats
from pmvis.platform.pseudo.store import RawMasks, rows_from_raw_masks, write_video_rows

H, W = 12, 16


def rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rect_box(y0: int, y1: int, x0: int, x1: int) -> list[float]:
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def track(aid: int, source: str, masks: list, confs: list, vid: int = 1) -> RawMasks:
    return RawMasks(video_id=vid, annotation_id=aid, source=source,
                    segmentations=[None if m is None else encode_mask(m) for m in masks],
                    confidences=list(confs))


def dataset(boxes: list, h: int = H, w: int = W, aid: int = 1) -> YTVISDataset:
    T = len(boxes)
    video = Video(id=1, width=w, height=h, file_names=[f"v/{t:05d}.jpg" for t in range(T)])
    ann = Annotation(id=aid, video_id=1, category_id=1, segmentations=[None] * T, bboxes=list(boxes),
                     areas=[None] * T, extra={"note": "kept"})
    return YTVISDataset(videos={1: video}, annotations=[ann], categories={1: "thing"})


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_lookups():
    cfg = FuseConfig()
    assert cfg.mode == "select" and cfg.doob and cfg.doob_margin == 0 and cfg.vote_threshold == 0.5
    assert cfg.weight("grabcut") == 0.5 and cfg.weight("unlisted") == 1.0
    assert cfg.threshold("boxinst") == 0.3 and cfg.threshold("unlisted") == 0.0
    assert cfg.sources is None


@pytest.mark.parametrize("values, field", [
    ({"source_weights": {"hqsam": -0.1}}, "source_weights.hqsam"),
    ({"source_weights": {"hqsam": float("inf")}}, "source_weights.hqsam"),
    ({"scm_thresholds": {"track": 1.5}}, "scm_thresholds.track"),
    ({"scm_thresholds": {"track": -0.1}}, "scm_thresholds.track"),
    ({"vote_threshold": 0.0}, "vote_threshold"),
    ({"vote_threshold": 1.01}, "vote_threshold"),
    ({"doob_margin": -1}, "doob_margin"),
    ({"mode": "average"}, "mode"),
    ({"sources": []}, "sources"),
    ({"sources": ["hqsam", "hqsam"]}, "sources"),
    ({"srcs": ["hqsam"]}, "srcs"),
])
def test_config_rejects_bad_values(values, field):
    with pytest.raises(PmvisError, match=field.replace(".", r"\.")):
        build_config(FuseConfig, values, source="fuse.yaml")


# ----------------------------------------------------------------------------- mechanisms


def test_doob_zeroes_outside_box():
    full = np.ones((H, W), dtype=bool)
    out = doob(full, [4, 3, 5, 4])
    assert np.array_equal(out, rect(3, 7, 4, 9))
    assert full.all()  # input untouched


def test_doob_margin_and_clipping():
    full = np.ones((H, W), dtype=bool)
    assert np.array_equal(doob(full, [4, 3, 5, 4], margin=2), rect(1, 9, 2, 11))
    # A margin reaching past the image is clipped to it.
    assert np.array_equal(doob(full, [0, 0, 3, 3], margin=5), rect(0, 8, 0, 8))
    assert np.array_equal(doob(full, [13, 9, 3, 3], margin=4), rect(5, 12, 9, 16))
    assert doob_window([13, 9, 3, 3], 4, H, W) == (9, 5, 16, 12)


def test_doob_keeps_pixels_partly_inside_a_fractional_box():
    full = np.ones((H, W), dtype=bool)
    assert np.array_equal(doob(full, [4.5, 3.2, 2.0, 2.0]), rect(3, 6, 4, 7))
    # An empty box keeps nothing.
    assert not doob(full, [5, 5, 0, 0]).any()


def test_scm_per_source_thresholds():
    cfg = FuseConfig()
    assert not scm_keep(0.49, "hqsam", cfg)
    assert scm_keep(0.5, "hqsam", cfg)  # the threshold itself survives
    assert scm_keep(0.3, "boxinst", cfg) and not scm_keep(0.29, "boxinst", cfg)
    assert scm_keep(0.0, "grabcut", cfg)
    assert scm_keep(0.0, "unlisted", cfg)  # not in the dict: threshold 0
    assert not scm_keep(None, "hqsam", cfg) and scm_keep(None, "grabcut", cfg)  # null counts as 0
    cfg = FuseConfig(scm_thresholds={"grabcut": 0.9})
    assert not scm_keep(0.8, "grabcut", cfg)
    assert scm_keep(0.1, "hqsam", cfg)  # the dict replaced the defaults whole


def test_box_tightness():
    box = rect_box(2, 6, 4, 8)
    assert box_tightness(rect(2, 6, 4, 8), box) == 1.0
    assert box_tightness(rect(2, 6, 4, 6), box) == 0.5
    # Only the mask's bounding box matters, not its fill.
    ring = rect(2, 6, 4, 8) & ~rect(3, 5, 5, 7)
    assert box_tightness(ring, box) == 1.0
    assert box_tightness(np.zeros((H, W), bool), box) == 0.0
    # Disjoint: 0; enclosing box twice the size: 0.5.
    assert box_tightness(rect(8, 10, 10, 12), box) == 0.0
    assert box_tightness(rect(2, 10, 4, 8), box) == 0.5


def test_select_picks_highest_weight_confidence_tightness():
    box = rect_box(2, 6, 4, 8)
    tight, half = rect(2, 6, 4, 8), rect(2, 6, 4, 6)
    survivors = {"hqsam": (tight, 0.6), "track": (half, 1.0)}  # qualities 0.6 and 0.5
    r = select_mask(survivors, box, FuseConfig())
    assert r.source == "hqsam" and r.quality == pytest.approx(0.6) and np.array_equal(r.mask, tight)
    r = select_mask(survivors, box, FuseConfig(source_weights={"hqsam": 1.0, "track": 2.0}))
    assert r.source == "track" and r.quality == pytest.approx(1.0) and np.array_equal(r.mask, half)
    # Ties go to the source listed first.
    tie = {"b": (tight, 0.5), "a": (tight, 0.5)}
    assert select_mask(tie, box, FuseConfig()).source == "b"
    assert select_mask({}, box, FuseConfig()) is None


def test_vote_three_sources():
    box = rect_box(2, 10, 0, 16)
    a, b, c = rect(2, 10, 0, 8), rect(2, 10, 4, 12), rect(2, 10, 8, 16)
    cfg = FuseConfig(source_weights={"a": 1.0, "b": 0.5, "c": 1.0})
    survivors = {"a": (a, 0.5), "b": (b, 0.5), "c": (c, 0.25)}  # w·c = 0.5, 0.25, 0.25
    # Column votes: 0-3 a=0.5, 4-7 a+b=0.75, 8-11 b+c=0.5, 12-15 c=0.25.
    r = vote_masks(survivors, box, cfg)
    assert r.source == "vote" and np.array_equal(r.mask, rect(2, 10, 0, 12))
    # Quality: weighted mean confidence (1.0 / 2.5) × tightness (12/16).
    assert r.quality == pytest.approx(0.4 * 0.75)
    r = vote_masks(survivors, box, cfg.model_copy(update={"vote_threshold": 0.6}))
    assert np.array_equal(r.mask, rect(2, 10, 4, 8))
    # Raising c's weight moves the vote.
    r = vote_masks(survivors, box, FuseConfig(source_weights={"a": 1.0, "b": 0.5, "c": 4.0}))
    assert np.array_equal(r.mask, rect(2, 10, 8, 16))
    # Nothing reaches the threshold: no mask.
    disjoint = {"a": (rect(0, 2, 0, 2), 0.5), "b": (rect(4, 6, 4, 6), 0.5), "c": (rect(8, 10, 8, 10), 0.5)}
    assert vote_masks(disjoint, box, FuseConfig()) is None


def test_fuse_frame_applies_doob_then_scm():
    box = rect_box(2, 6, 4, 8)
    big = rect(0, 12, 0, 16)  # DOOB cuts it to the box: tightness 1
    cands = {"hqsam": (big, 0.45), "track": (rect(2, 6, 4, 6), 0.9), "grabcut": (None, None)}
    r = fuse_frame(cands, box, FuseConfig())
    assert r.source == "track"  # hqsam below its SCM threshold 0.5
    r = fuse_frame({**cands, "hqsam": (big, 0.55)}, box, FuseConfig())
    assert r.source == "hqsam" and np.array_equal(r.mask, rect(2, 6, 4, 8))
    # Without DOOB the whole-image mask is loose: tightness 16/192.
    r = fuse_frame({"hqsam": (big, 1.0)}, box, FuseConfig(doob=False))
    assert np.array_equal(r.mask, big) and r.quality == pytest.approx(16 / 192)
    # A mask entirely outside the box does not survive DOOB; weight 0 switches a source off.
    assert fuse_frame({"hqsam": (rect(8, 10, 10, 12), 1.0)}, box, FuseConfig()) is None
    assert fuse_frame({"hqsam": (big, 1.0)}, box, FuseConfig(source_weights={"hqsam": 0.0})) is None


# ----------------------------------------------------------------------------- fuse_annotations


def test_fuse_annotations_frames_quality_and_source():
    box = rect_box(2, 6, 4, 8)
    ds = dataset([box, box, None, box])
    tracks = [
        track(1, "hqsam", [rect(2, 6, 4, 8), rect(0, 12, 0, 16), rect(2, 6, 4, 8), None], [0.9, 0.8, 0.9, None]),
        track(1, "grabcut", [rect(2, 6, 4, 8), rect(2, 6, 4, 6), rect(2, 6, 4, 8), None], [1.0, 1.0, 1.0, None]),
    ]
    fused, stats = fuse_with_stats(ds, tracks, FuseConfig())
    a = fused.annotations[0]
    assert a.id == 1 and a.bboxes == [box, box, None, box]
    # Frame 0: hqsam 0.9 vs grabcut 0.5; frame 1: hqsam DOOB-cut to the box, 0.8 vs 0.25.
    assert a.extra["frame_source"] == ["hqsam", "hqsam", None, None]
    assert a.extra["frame_quality"] == pytest.approx([0.9, 0.8, None, None])
    assert a.extra["quality"] == pytest.approx(0.85)
    assert a.extra["note"] == "kept"
    # Frame 2 has source masks but no GT box: None. Frame 3 has a box but no mask: None.
    assert a.segmentations[2] is None and a.segmentations[3] is None
    assert np.array_equal(decode_mask(a.segmentations[1]), rect(2, 6, 4, 8))
    assert a.areas == [16, 16, None, None]
    assert stats["fused_masks"] == 2 and stats["chosen"] == {"hqsam": 2}
    assert stats["frames_with_box"] == 3 and stats["frames_no_source_mask"] == 1
    assert stats["frames_without_fused_mask"] == 1 and stats["mean_quality"] == pytest.approx(0.85)
    assert fused.info["fusion"]["stats"] == stats
    # The input dataset is untouched.
    assert ds.annotations[0].segmentations == [None] * 4 and "quality" not in ds.annotations[0].extra
    # Vote mode names the source "vote".
    voted = fuse_annotations(ds, tracks, FuseConfig(mode="vote"))
    assert voted.annotations[0].extra["frame_source"] == ["vote", "vote", None, None]


def test_fuse_annotations_no_survivor_is_none_and_counted():
    box = rect_box(2, 6, 4, 8)
    ds = dataset([box, box])
    tracks = [track(1, "hqsam", [rect(2, 6, 4, 8), rect(8, 10, 10, 12)], [0.2, 0.9])]
    fused, stats = fuse_with_stats(ds, tracks, FuseConfig())
    a = fused.annotations[0]
    assert a.segmentations == [None, None] and a.extra["quality"] is None
    assert stats["frames_rejected"] == 2 and stats["scm_dropped"] == {"hqsam": 1} and stats["empty"] == {"hqsam": 1}
    assert stats["annotations_without_fused_mask"] == 1


def test_fuse_annotations_respects_sources_and_order():
    box = rect_box(2, 6, 4, 8)
    ds = dataset([box])
    tracks = [track(1, "hqsam", [rect(2, 6, 4, 8)], [0.9]), track(1, "track", [rect(2, 6, 4, 8)], [0.9])]
    # Equal quality: the first of `sources` wins; sources=None sorts by name.
    assert fuse_annotations(ds, tracks, FuseConfig()).annotations[0].extra["frame_source"] == ["hqsam"]
    cfg = FuseConfig(sources=["track", "hqsam"])
    assert fuse_annotations(ds, tracks, cfg).annotations[0].extra["frame_source"] == ["track"]
    cfg = FuseConfig(sources=["hqsam"])
    assert fuse_with_stats(ds, tracks, cfg)[1]["considered"] == {"hqsam": 1}


def test_fuse_errors_unknown_source_and_annotation():
    box = rect_box(2, 6, 4, 8)
    ds = dataset([box])
    tracks = [track(1, "hqsam", [rect(2, 6, 4, 8)], [0.9])]
    with pytest.raises(PmvisError, match=r"\['sam'\].*not in the raw pseudo-mask store"):
        fuse_annotations(ds, tracks, FuseConfig(sources=["hqsam", "sam"]))
    with pytest.raises(PmvisError, match=r"annotation id\(s\) 7, 9 "):
        fuse_annotations(ds, tracks + [track(9, "hqsam", [None], [None]), track(7, "hqsam", [None], [None])],
                         FuseConfig())
    wrong_size = [track(1, "hqsam", [rect(2, 6, 4, 8, h=10, w=10)], [0.9])]
    with pytest.raises(PmvisError, match=r"frame 0: mask size \[10, 10\]"):
        fuse_annotations(ds, wrong_size, FuseConfig())
    with pytest.raises(PmvisError, match="1-frame video"):
        fuse_annotations(ds, [track(1, "hqsam", [None, None], [None, None])], FuseConfig())
    with pytest.raises(PmvisError, match="stored for video id=2"):
        fuse_annotations(ds, [track(1, "hqsam", [None], [None], vid=2)], FuseConfig())
    with pytest.raises(PmvisError, match="empty"):
        fuse_annotations(ds, [], FuseConfig())


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray | None:
    if rng.random() < 0.15:
        return None
    m = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 4)):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:y0 + rng.integers(1, 8), x0:x0 + rng.integers(1, 10)] = True
    return m


@pytest.mark.parametrize("mode, max_rle_voters", [("select", 8), ("vote", 8), ("vote", 1)])
@pytest.mark.parametrize("doob_on, margin", [(True, 0), (True, 2), (False, 0)])
def test_fuse_annotations_matches_numpy_reference(monkeypatch, mode, max_rle_voters, doob_on, margin):
    """The RLE implementation gives exactly what the numpy reference definitions give
    (max_rle_voters 1: votes among several survivors take the decoding path)."""
    monkeypatch.setattr("pmvis.platform.pseudo.fuse.MAX_RLE_VOTERS", max_rle_voters)
    rng = np.random.default_rng([7, doob_on, margin, mode == "vote", max_rle_voters])
    T = 80
    boxes = []
    for _ in range(T):
        if rng.random() < 0.1:
            boxes.append(None)
        else:
            x, y = float(rng.integers(0, W - 2)), float(rng.integers(0, H - 2))
            boxes.append([x, y, float(rng.integers(1, W - x + 1)), float(rng.integers(1, H - y + 1))])
    sources = ["hqsam", "track", "grabcut", "boxinst"]
    masks = {s: [_blob(rng, H, W) for _ in range(T)] for s in sources}
    confs = {s: [None if m is None else round(float(rng.uniform(0.2, 1.0)), 2) for m in masks[s]] for s in sources}
    tracks = [track(1, s, masks[s], confs[s]) for s in sources]
    cfg = FuseConfig(mode=mode, doob=doob_on, doob_margin=margin, sources=sources, vote_threshold=0.45,
                     source_weights={"hqsam": 1.0, "track": 0.8, "grabcut": 0.5, "boxinst": 0.7})
    fused = fuse_annotations(dataset(boxes), tracks, cfg).annotations[0]
    n_fused = 0
    for t in range(T):
        ref = None if boxes[t] is None else fuse_frame(
            {s: (masks[s][t], confs[s][t]) for s in sources}, boxes[t], cfg)
        if ref is None:
            assert fused.segmentations[t] is None and fused.extra["frame_quality"][t] is None
            continue
        n_fused += 1
        assert np.array_equal(decode_mask(fused.segmentations[t]), ref.mask), t
        assert fused.extra["frame_quality"][t] == ref.quality and fused.extra["frame_source"][t] == ref.source
        assert fused.areas[t] == int(ref.mask.sum())
    assert n_fused > T // 3


# ----------------------------------------------------------------------------- `pmvis fuse`


def make_store(tmp_path, *, inaccurate_rate=0.3, missing_rate=0.2):
    """A tiny synthetic dataset and a raw store: hqsam = truth on the user file's box frames
    (0.9), track = truth on every visible frame (0.85), grabcut = the filled truth box (0.6)."""
    data = tmp_path / "data"
    generate_synthetic(data, SynthConfig(videos=2, frames=4, height=48, width=64,
                                         inaccurate_rate=inaccurate_rate, missing_rate=missing_rate))
    truth = load_ytvis(data / "truth.json")
    user = {a.id: a for a in load_ytvis(data / "annotations.json").annotations}
    raw = tmp_path / "pm" / "raw"
    for vid, anns in truth.annotations_by_video().items():
        v = truth.videos[vid]
        per_source = {"hqsam": [], "track": [], "grabcut": []}
        for a in anns:
            T = v.length
            tm = [None if s is None else decode_mask(s) for s in a.segmentations]
            hq = [m if user[a.id].bboxes[t] is not None else None for t, m in enumerate(tm)]
            boxes = []
            for t, m in enumerate(tm):
                if m is None:
                    boxes.append(None)
                else:
                    x, y, w, h = (int(b) for b in a.bboxes[t])
                    boxes.append(rect(y, y + h, x, x + w, v.height, v.width))
            per_source["hqsam"].append(track(a.id, "hqsam", hq, [None if m is None else 0.9 for m in hq], vid))
            per_source["track"].append(track(a.id, "track", tm, [None if m is None else 0.85 for m in tm], vid))
            per_source["grabcut"].append(track(a.id, "grabcut", boxes, [None if m is None else 0.6 for m in boxes], vid))
            assert len(tm) == T
        for source, tracks in per_source.items():
            write_video_rows(raw, source, vid, rows_from_raw_masks(tracks, v.height, v.width))
    return data, tmp_path / "pm"


def test_fuse_cli_end_to_end(tmp_path, capsys):
    data, pm = make_store(tmp_path)
    out = tmp_path / "train.json"
    assert main(["fuse", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fused masks" in text and "hqsam" in text and "mean quality" in text
    fused = load_ytvis(out)  # a valid YTVIS file
    truth = {a.id: a for a in load_ytvis(data / "truth.json").annotations}
    user = {a.id: a for a in load_ytvis(data / "annotations.json").annotations}
    n = 0
    for a in fused.annotations:
        assert a.bboxes == user[a.id].bboxes
        for t, seg in enumerate(a.segmentations):
            if user[a.id].bboxes[t] is None:
                assert seg is None
            else:  # hqsam (= truth) wins: 0.9 × 1 beats track 0.85 × 1 and grabcut 0.5 × 0.6
                assert seg == truth[a.id].segmentations[t] and a.extra["frame_source"][t] == "hqsam"
                n += 1
        assert a.extra["quality"] == pytest.approx(0.9)
    assert n > 0
    cfg = yaml.safe_load((tmp_path / "train.config.yaml").read_text())
    assert build_config(FuseConfig, cfg) == FuseConfig()
    info = json.loads(out.read_text())["info"]
    assert info["fusion"]["stats"]["chosen"] == {"hqsam": n}


def test_fuse_cli_config_file_and_annotations_flag(tmp_path, capsys):
    data, pm = make_store(tmp_path)
    conf = tmp_path / "fuse.yaml"
    # track's confidence here (0.85) must pass SCM: its default threshold (0.9) is set lower.
    conf.write_text("mode: vote\nsources: [track, grabcut]\nvote_threshold: 0.6\n"
                    "scm_thresholds: {hqsam: 0.5, track: 0.5, grabcut: 0.0}\n")
    out = tmp_path / "o" / "train.json"
    rc = main(["fuse", "--data", str(data), "--pseudo-masks", str(pm / "raw"), "--out", str(out),
               "--config", str(conf), "--annotations", "truth.json"])
    assert rc == 0, capsys.readouterr().err
    fused = load_ytvis(out)
    truth = {a.id: a for a in load_ytvis(data / "truth.json").annotations}
    for a in fused.annotations:
        for t, seg in enumerate(a.segmentations):
            # track (w·c 0.85) outvotes grabcut (0.3): 0.85 / 1.15 ≥ 0.6 > 0.3 / 1.15.
            assert seg == truth[a.id].segmentations[t]
            assert a.extra["frame_source"][t] == (None if seg is None else "vote")
    assert yaml.safe_load((out.parent / "train.config.yaml").read_text())["mode"] == "vote"


@pytest.mark.parametrize("config_text, message", [
    ("source_weights: {hqsam: -1}\n", "source_weights.hqsam"),
    ("sources: [hqsam, sam]\n", "['sam'] not in the raw pseudo-mask store"),
    ("tau: 3\n", "tau"),
])
def test_fuse_cli_bad_config_exits_2_without_output(tmp_path, capsys, config_text, message):
    data, pm = make_store(tmp_path)
    conf = tmp_path / "fuse.yaml"
    conf.write_text(config_text)
    out = tmp_path / "train.json"
    assert main(["fuse", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(out), "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "pmvis fuse: error:" in err and message in err
    assert not out.exists() and not (tmp_path / "train.config.yaml").exists()


def test_fuse_cli_store_from_other_dataset_and_missing_store(tmp_path, capsys):
    data, pm = make_store(tmp_path)
    write_video_rows(pm / "raw", "hqsam", 99, rows_from_raw_masks([track(12345, "hqsam", [None] * 4, [None] * 4, 99)],
                                                                 48, 64))
    out = tmp_path / "train.json"
    assert main(["fuse", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(out)]) == 2
    assert "annotation id(s) 12345" in capsys.readouterr().err and not out.exists()
    assert main(["fuse", "--data", str(data), "--pseudo-masks", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no raw pseudo-mask store" in capsys.readouterr().err
    assert main(["fuse", "--data", str(data), "--pseudo-masks", str(pm), "--out", str(data / "annotations.json")]) == 2
    assert "overwrite the input" in capsys.readouterr().err
