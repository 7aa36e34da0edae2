"""YouTube-VIS evaluation on hand-computed cases (official ytvoseval semantics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import rect, rle

from pmvis.cli import main
from pmvis.core.errors import PmvisError
from pmvis.platform.data.results_io import parse_results
from pmvis.platform.data.ytvis_io import parse_ytvis
from pmvis.platform.evaluation import evaluate_ytvis
from pmvis.platform.spatiotemporal_iou import mask_quality, spatio_temporal_iou, track_intersections

H = W = 40
# Recall reaches 0.5 → the 51 recall points 0.00..0.50 have precision 1.
HALF_RECALL_AP = 100 * 51 / 101


def _dataset(videos: dict[int, int], anns: list[dict], *, size=(H, W), categories=(1, 2)) -> dict:
    """videos: {video_id: length}; anns: {id, video_id, category_id, masks: [mask|None], iscrowd?}."""
    h, w = size
    return {
        "videos": [{"id": v, "width": w, "height": h, "length": n,
                    "file_names": [f"v{v}/{t:05d}.jpg" for t in range(n)]} for v, n in videos.items()],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
        "annotations": [
            {"id": a["id"], "video_id": a["video_id"], "category_id": a.get("category_id", 1),
             "iscrowd": a.get("iscrowd", 0),
             "segmentations": [None if m is None else rle(m) for m in a["masks"]]}
            for a in anns
        ],
    }


def _results(preds: list[dict]) -> list[dict]:
    return [{"video_id": p["video_id"], "category_id": p.get("category_id", 1), "score": p["score"],
             "segmentations": [None if m is None else rle(m) for m in p["masks"]]} for p in preds]


def _evaluate(gt_dict, preds):
    gt = parse_ytvis(gt_dict)
    return evaluate_ytvis(gt, parse_results(_results(preds), gt)).metrics


SQ = rect(H, W, 5, 15, 5, 15)  # area 100: "small"
SQ2 = rect(H, W, 20, 30, 20, 30)


def test_perfect_predictions_score_100():
    gt = _dataset({1: 2, 2: 2}, [
        {"id": 1, "video_id": 1, "masks": [SQ, SQ2]},
        {"id": 2, "video_id": 1, "category_id": 2, "masks": [SQ2, None]},
        {"id": 3, "video_id": 2, "masks": [None, SQ]},
    ])
    preds = [{"video_id": 1, "score": 0.9, "masks": [SQ, SQ2]},
             {"video_id": 1, "category_id": 2, "score": 0.8, "masks": [SQ2, None]},
             {"video_id": 2, "score": 0.7, "masks": [None, SQ]}]
    m = _evaluate(gt, preds)
    for k in ("AP", "AP50", "AP75", "APs", "AR1", "AR10"):
        assert m[k] == pytest.approx(100.0), k
    assert m["APm"] is None and m["APl"] is None  # no ground truth in those ranges: official -1


def test_one_missed_instance_halves_recall():
    gt = _dataset({1: 1, 2: 1}, [{"id": 1, "video_id": 1, "masks": [SQ]}, {"id": 2, "video_id": 2, "masks": [SQ]}])
    m = _evaluate(gt, [{"video_id": 1, "score": 0.9, "masks": [SQ]}])
    assert m["AP"] == pytest.approx(HALF_RECALL_AP)
    assert m["AR1"] == pytest.approx(50.0) and m["AR10"] == pytest.approx(50.0)


def test_wrong_category_scores_zero_and_per_category():
    gt_dict = _dataset({1: 1}, [{"id": 1, "video_id": 1, "category_id": 1, "masks": [SQ]}])
    gt = parse_ytvis(gt_dict)
    res = evaluate_ytvis(gt, parse_results(_results([{"video_id": 1, "category_id": 2, "score": 0.9,
                                                        "masks": [SQ]}]), gt))
    assert res.metrics["AP"] == 0.0 and res.metrics["AR10"] == 0.0
    assert res.per_category == {"c1": 0.0, "c2": None}  # c2 has no ground truth: undefined, not 0


def test_spatio_temporal_iou_with_null_frames_on_either_side():
    a = rect(H, W, 0, 4, 0, 5)      # 20 px
    b = rect(H, W, 0, 4, 0, 10)     # 40 px, contains a
    c = rect(H, W, 10, 16, 0, 5)    # 30 px
    det = [[rle(a), rle(b), None]]
    gt = [[rle(b), None, rle(c)]]
    inter, d_area, g_area = track_intersections(det, gt)
    # frame 0: I=20, U=40; frame 1: det only, U+=40; frame 2: gt only, U+=30
    assert inter[0, 0] == 20 and d_area[0] == 60 and g_area[0] == 70
    assert spatio_temporal_iou(inter, d_area, g_area)[0, 0] == pytest.approx(20 / 110)


def test_null_frame_on_one_side_sets_iou_half_so_only_ap50_matches():
    gt = _dataset({1: 2}, [{"id": 1, "video_id": 1, "masks": [SQ, SQ]}])
    m = _evaluate(gt, [{"video_id": 1, "score": 0.9, "masks": [SQ, None]}])  # IoU = 100/200
    assert m["AP50"] == pytest.approx(100.0)  # IoU 0.5 matches at threshold 0.5 (>=)
    assert m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(10.0)     # 1 of 10 thresholds


def test_crowd_ground_truth_is_ignored_and_absorbs_detections():
    crowd = rect(H, W, 20, 35, 20, 35)
    gt = _dataset({1: 1}, [{"id": 1, "video_id": 1, "masks": [SQ]},
                           {"id": 2, "video_id": 1, "masks": [crowd], "iscrowd": 1}])
    preds = [{"video_id": 1, "score": 0.95, "masks": [crowd]},
             {"video_id": 1, "score": 0.94, "masks": [crowd]},
             {"video_id": 1, "score": 0.9, "masks": [SQ]}]
    m = _evaluate(gt, preds)
    assert m["AP"] == pytest.approx(100.0)  # detections on the crowd are neither TP nor FP
    # Sanity: the same detections without the crowd region annotated are false positives.
    gt_no_crowd = _dataset({1: 1}, [{"id": 1, "video_id": 1, "masks": [SQ]}])
    assert _evaluate(gt_no_crowd, preds)["AP"] < 50.0


def test_area_ranges_on_average_non_null_area():
    size = (300, 300)
    small = rect(300, 300, 0, 10, 0, 10)        # 100 < 128²
    medium = rect(300, 300, 0, 150, 0, 150)     # 22500 in [128², 256²]
    large = rect(300, 300, 0, 280, 0, 280)      # 78400 > 256²
    gt = _dataset({1: 2, 2: 1, 3: 1}, [
        {"id": 1, "video_id": 1, "masks": [small, None]},   # average over non-null frames: 100
        {"id": 2, "video_id": 2, "masks": [medium]},
        {"id": 3, "video_id": 3, "masks": [large]},
    ], size=size)
    perfect = [{"video_id": 1, "score": 0.9, "masks": [small, None]},
               {"video_id": 2, "score": 0.8, "masks": [medium]},
               {"video_id": 3, "score": 0.7, "masks": [large]}]
    m = _evaluate(gt, perfect)
    assert (m["APs"], m["APm"], m["APl"]) == pytest.approx((100.0, 100.0, 100.0))
    m = _evaluate(gt, [perfect[0], perfect[2]])  # miss the medium one
    assert m["APm"] == 0.0 and m["APs"] == pytest.approx(100.0) and m["APl"] == pytest.approx(100.0)
    assert m["AP"] == pytest.approx(100 * 67 / 101)  # recall 2/3 → points 0.00..0.66
    # An unmatched small detection is ignored in the large range but is a false positive overall.
    fp_small = {"video_id": 3, "score": 0.99, "masks": [rect(300, 300, 290, 300, 290, 300)]}
    m = _evaluate(gt, perfect + [fp_small])
    assert m["APl"] == pytest.approx(100.0) and m["AP"] < 100.0


def test_max_dets_limits_ar1_and_ar10():
    gt = _dataset({1: 1}, [{"id": 1, "video_id": 1, "masks": [SQ]}, {"id": 2, "video_id": 1, "masks": [SQ2]}])
    m = _evaluate(gt, [{"video_id": 1, "score": 0.9, "masks": [SQ]}, {"video_id": 1, "score": 0.8, "masks": [SQ2]}])
    assert m["AR1"] == pytest.approx(50.0) and m["AR10"] == pytest.approx(100.0)
    junk = rect(H, W, 35, 40, 35, 40)
    preds = [{"video_id": 1, "score": 0.99 - i / 100, "masks": [junk]} for i in range(10)]
    preds.append({"video_id": 1, "score": 0.1, "masks": [SQ]})  # ranked 11th in its video
    m = _evaluate(gt, preds)
    assert m["AR10"] == 0.0 and m["AR1"] == 0.0
    assert m["AP"] > 0.0  # maxDets 100 still sees it


def test_empty_results_are_zero_not_an_error():
    gt = _dataset({1: 1}, [{"id": 1, "video_id": 1, "masks": [SQ]}])
    m = _evaluate(gt, [])
    assert m["AP"] == 0.0 and m["AR1"] == 0.0 and m["APm"] is None


def test_mask_quality_same_ids():
    gt = parse_ytvis(_dataset({1: 2}, [{"id": 1, "video_id": 1, "masks": [SQ, SQ]},
                                       {"id": 2, "video_id": 1, "masks": [SQ2, None]}]))
    pred = parse_ytvis(_dataset({1: 2}, [{"id": 1, "video_id": 1, "masks": [SQ, None]},
                                         {"id": 2, "video_id": 1, "masks": [SQ2, None]}]))
    q = mask_quality(pred.annotations, gt)
    assert q.per_annotation == {1: pytest.approx(0.5), 2: pytest.approx(1.0)}
    assert q.mean == pytest.approx(0.75) and q.share_above(0.75) == pytest.approx(0.5)


def test_cli_writes_metrics_and_rejects_bad_results(tmp_path, capsys):
    gt = _dataset({1: 1}, [{"id": 1, "video_id": 1, "masks": [SQ]}])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(_results([{"video_id": 1, "score": 0.9, "masks": [SQ]}])))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "res.json"),
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["AP"] == pytest.approx(100.0) and metrics["APl"] is None
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "per_category_AP"}
    assert "AP50" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps([{"video_id": 5, "category_id": 1, "score": 1,
                                                    "segmentations": [None]}]))
    assert main(["evaluate", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "bad.json"),
                 "--out", str(tmp_path / "m2.json")]) == 2
    assert "video id=5" in capsys.readouterr().err
    assert not (tmp_path / "m2.json").exists()


# ----------------------------------------------------------------------------- fast path == exact path


def _random_masks(rng: np.random.Generator, frames: int, base: np.ndarray | None = None) -> list[np.ndarray | None]:
    """A blob track: a jittered copy of ``base`` or a new random rectangle union; some frames
    absent (None) and some present but empty."""
    out: list[np.ndarray | None] = []
    for t in range(frames):
        roll = rng.random()
        if roll < 0.15:
            out.append(None)
        elif roll < 0.2:
            out.append(np.zeros((H, W), dtype=bool))
        elif base is not None and base[t] is not None:
            out.append(np.roll(base[t], tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) | (rng.random((H, W)) < 0.02))
        else:
            y, x = rng.integers(0, H - 4), rng.integers(0, W - 4)
            out.append(rect(H, W, y, y + int(rng.integers(3, 20)), x, x + int(rng.integers(3, 20))))
    return out


def _random_set(seed: int, videos: int = 12, frames: int = 5) -> tuple[dict, list[dict]]:
    """Many overlapping same- and cross-category tracks, crowd ground truth, None and empty frames."""
    rng = np.random.default_rng(seed)
    anns, preds, tracks = [], [], {}
    for v in range(1, videos + 1):
        tracks[v] = []
        for _ in range(int(rng.integers(1, 5))):
            masks = _random_masks(rng, frames)
            if all(m is None or not m.any() for m in masks):
                masks[0] = SQ
            cat = int(rng.integers(1, 4))
            tracks[v].append((masks, cat))
            anns.append({"id": len(anns) + 1, "video_id": v, "category_id": cat, "masks": masks,
                         "iscrowd": int(rng.random() < 0.15)})
        for _ in range(int(rng.integers(0, 12))):
            base, cat = tracks[v][int(rng.integers(len(tracks[v])))]
            masks = _random_masks(rng, frames, base if rng.random() < 0.7 else None)
            preds.append({"video_id": v, "category_id": cat if rng.random() < 0.8 else int(rng.integers(1, 4)),
                          "score": float(rng.random()), "masks": masks})
    return _dataset({v: frames for v in range(1, videos + 1)}, anns, categories=(1, 2, 3)), preds


@pytest.mark.parametrize("seed", range(4))
def test_pruned_evaluation_equals_exact_evaluation(seed):
    gt_dict, preds = _random_set(seed)
    gt = parse_ytvis(gt_dict)
    results = parse_results(_results(preds), gt)
    fast, exact = evaluate_ytvis(gt, results), evaluate_ytvis(gt, results, prune=False)
    np.testing.assert_array_equal(fast.precision, exact.precision)
    np.testing.assert_array_equal(fast.recall, exact.recall)
    assert fast.metrics == exact.metrics and fast.metrics["AP"] > 0.0


def test_track_intersections_count_pixels_of_same_frame_masks():
    """The run walk gives the pixel counts per same-frame pair (None frames add nothing), for the
    data layer's str counts and pycocotools' bytes counts alike."""
    rng = np.random.default_rng(7)
    base = _random_masks(rng, 6)
    dts = [_random_masks(rng, 6, base) for _ in range(5)] + [base]
    gts = [base, _random_masks(rng, 6)]

    def as_rles(track: list[np.ndarray | None], as_bytes: bool = False) -> list[dict | None]:
        out = [None if m is None else rle(m) for m in track]
        return [r if r is None or not as_bytes else {**r, "counts": r["counts"].encode()} for r in out]

    expected = np.array([[sum(int(np.count_nonzero(a & b)) for a, b in zip(d, g) if a is not None and b is not None)
                          for g in gts] for d in dts])
    inter, dt_area, gt_area = track_intersections([as_rles(d) for d in dts], [as_rles(g, as_bytes=True) for g in gts])
    np.testing.assert_array_equal(inter, expected)
    np.testing.assert_array_equal(dt_area, [sum(int(m.sum()) for m in d if m is not None) for d in dts])
    np.testing.assert_array_equal(gt_area, [sum(int(m.sum()) for m in g if m is not None) for g in gts])


def test_rle_kernel_parses_long_runs_and_deltas_as_pycocotools():
    """720p masks need counts of up to 6 characters and negative deltas; areas and intersections
    must equal pycocotools' on them."""
    from pycocotools import mask as mask_utils

    from pmvis.kernels.rle import pair_intersections, parse_counts

    rng = np.random.default_rng(0)
    h, w = 720, 1280
    masks = [np.zeros((h, w), np.uint8), np.ones((h, w), np.uint8)]
    for _ in range(6):
        m = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 50), rng.integers(0, w - 50)
        m[y:y + int(rng.integers(1, h - y)), x:x + int(rng.integers(1, w - x))] = 1
        m[rng.random((h, w)) < 0.001] ^= 1
        masks.append(m)
    coco = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    runs, offsets, areas, totals = parse_counts([c["counts"].decode() for c in coco])
    assert totals.tolist() == [h * w] * len(masks)
    np.testing.assert_array_equal(areas, mask_utils.area(coco))
    idx = np.arange(len(masks))[:, None]
    pairs = np.stack(np.meshgrid(idx[:, 0], idx[:, 0], indexing="ij"), -1).reshape(-1, 2)
    inter = pair_intersections(runs, offsets, idx, idx, pairs)
    expected = [int(np.count_nonzero(masks[i] & masks[j])) for i, j in pairs]
    np.testing.assert_array_equal(inter, expected)


def test_masks_of_one_video_with_different_sizes_are_an_error():
    small = {"size": [H, W], "counts": rle(SQ)["counts"]}
    other = {"size": [H + 1, W], "counts": rle(np.zeros((H + 1, W), bool))["counts"]}
    with pytest.raises(PmvisError, match="differ in size"):
        track_intersections([[small]], [[other]])


def test_iou_upper_bound_holds_and_only_prunes_below_the_lowest_threshold():
    from pmvis.platform.evaluation import PRUNE_BELOW, _pair_ious
    from pmvis.platform.spatiotemporal_iou import RleTracks, iou_upper_bound

    gt_dict, preds = _random_set(11, videos=1, frames=6)
    rng = np.random.default_rng(3)
    gts = [a.segmentations for a in parse_ytvis(gt_dict).annotations]
    dts = [[None if m is None else rle(m) for m in _random_masks(rng, 6)] for _ in range(30)]
    d, g = RleTracks.build_many([dts, gts], 6)
    pairs = np.stack(np.meshgrid(np.arange(len(dts)), np.arange(len(gts)), indexing="ij"), -1).reshape(-1, 2)
    exact = _pair_ious(d, g, pairs, prune=False)
    bound = iou_upper_bound(d, g, pairs)
    assert np.all(bound >= exact)
    pruned = _pair_ious(d, g, pairs, prune=True)
    assert np.any((bound < PRUNE_BELOW) & (exact > 0))  # this set does exercise the pruning
    np.testing.assert_array_equal(pruned[bound >= PRUNE_BELOW], exact[bound >= PRUNE_BELOW])
    assert np.all(pruned[bound < PRUNE_BELOW] == 0) and np.all(exact[bound < PRUNE_BELOW] < PRUNE_BELOW)


def test_mask_quality_keeps_low_ious_exact():
    """mask_quality reports every IoU, so nothing below the AP thresholds may be pruned there."""
    low = rect(H, W, 5, 15, 5, 7)  # 20 of SQ's 100 px
    gt = parse_ytvis(_dataset({1: 2}, [{"id": 1, "video_id": 1, "masks": [SQ, SQ]}]))
    pred = parse_ytvis(_dataset({1: 2}, [{"id": 1, "video_id": 1, "masks": [low, None]}]))
    assert mask_quality(pred.annotations, gt).per_annotation == {1: pytest.approx(20 / 200)}
