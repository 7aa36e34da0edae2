"""YouTube-VIS evaluation on hand-computed cases (official ytvoseval semantics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import rect, rle
from pmvis.cli import main
from pmvis.platform.evaluation import evaluate_ytvis, mask_quality, spatio_temporal_iou, track_intersections
from pmvis.platform.ytvis import parse_results, parse_ytvis

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
