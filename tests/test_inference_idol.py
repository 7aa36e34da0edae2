"""IDOL's inference rules on hand-made detections (VNext idol.py / models/tracker.py), each with the
expected outcome worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmvis.models.vis.association import MemoryBankTracker, associate, associate_in_order, memory_embedding
from pmvis.models.vis.inference import Detection, InferenceConfig, Track, drop_short_tracks, select_queries
from pmvis.platform.predict import tracks_to_results


def _det(scores) -> Detection:
    return Detection(score=float(max(scores)), class_scores=np.array(scores, dtype=np.float32),
                     box=np.zeros(4, np.float32), mask={"size": [2, 2], "counts": b"04"})


def test_multi_class_output_one_result_per_class_above_threshold():
    tr = Track(id=0, detections={0: _det([0.5, 0.08, 0.01]), 1: _det([0.3, 0.04, 0.03])})
    # per-class means over the track's frames: [0.4, 0.06, 0.02]
    multi = tr.class_results(InferenceConfig())
    assert [c for c, _ in multi] == [0, 1]
    assert [s for _, s in multi] == pytest.approx([0.4, 0.06])
    assert tr.class_results(InferenceConfig(multi_class=False)) == [(0, pytest.approx(0.4))]
    results = tracks_to_results([tr], video_id=3, length=2, category_ids=[7, 8, 9])
    assert [(r.category_id, round(r.score, 3)) for r in results] == [(7, 0.4), (8, 0.06)]
    assert results[0].segmentations == results[1].segmentations  # the classes share the track's masks


def test_short_tracks_are_deleted_once_their_last_two_frames_are_missed():
    cfg = InferenceConfig()  # min 3 frames, from frame index 9 on
    present = {"A": {0, 1}, "B": {0, 1, 2}, "C": {8, 10}, "D": {0, 10, 11}}
    ids = {"A": 0, "B": 1, "C": 2, "D": 3}
    tracks: dict[int, Track] = {}
    for t in range(12):
        for name, frames in present.items():
            if t in frames:
                tracks.setdefault(ids[name], Track(id=ids[name])).detections[t] = _det([0.9])
        drop_short_tracks(tracks, t, cfg)
    # t=9: A (2 frames, missed at 8 and 9) and D (1 frame) are deleted; B has 3 frames; C was seen at 8.
    # t=10: D is matched again and restarts with only its new frames; t=11: C was seen at 10.
    assert {tid: sorted(tr.detections) for tid, tr in tracks.items()} == {1: [0, 1, 2], 2: [8, 10], 3: [10, 11]}
    kept = {}
    off = InferenceConfig(short_track_min_frames=0)
    for t in range(12):
        for name, frames in present.items():
            if t in frames:
                kept.setdefault(ids[name], Track(id=ids[name])).detections[t] = _det([0.9])
        drop_short_tracks(kept, t, off)
    assert sorted(kept) == [0, 1, 2, 3]


def test_memory_weights_add_the_temporal_weight_to_the_score():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # oldest first
    scores = torch.tensor([0.5, 0.5, 0.5])
    # IDOL: w = score + (1/3, 2/3, 1) = (5/6, 7/6, 3/2), sum 7/2
    expected = (5 / 6 * emb[0] + 7 / 6 * emb[1] + 3 / 2 * emb[2]) / 3.5
    assert torch.allclose(memory_embedding(emb, scores, "add"), expected)
    # pmvis's first rule: w = score × (1/3, 2/3, 1) = (1/6, 1/3, 1/2), sum 1
    assert torch.allclose(memory_embedding(emb, scores, "multiply"), emb[0] / 6 + emb[1] / 3 + emb[2] / 2)


def test_association_in_detection_order_with_frame_weighting():
    # two tracks pass 0.5 for the detection: × matched-frame counts (1, 5) → (0.6, 2.75): track 1
    s = torch.tensor([[0.6, 0.55]])
    assert associate_in_order(s, 0.5, torch.tensor([1.0, 5.0])) == [(0, 1)]
    assert associate_in_order(s, 0.5, None) == [(0, 0)]
    # one candidate only: no weighting, even with a long-lived other track
    assert associate_in_order(torch.tensor([[0.7, 0.3]]), 0.5, torch.tensor([1.0, 10.0])) == [(0, 0)]
    # detections in order: detection 0 (higher score) takes track 0 first; detection 1 is left with
    # track 1 at 0.1 → unmatched. Global mutual-best would pair (1, 0) at 0.95, then (0, 1) at 0.8.
    s2 = torch.tensor([[0.9, 0.8], [0.95, 0.1]])
    assert associate_in_order(s2, 0.5) == [(0, 0)]
    assert associate(s2, 0.5) == [(1, 0), (0, 1)]


def test_tracker_counts_matched_frames_and_forgets_after_max_missed():
    cfg = InferenceConfig(max_missed=2)
    tracker = MemoryBankTracker(cfg)
    e = torch.tensor([[5.0, 0.0]])
    assert tracker.step(e, torch.tensor([0.9])) == [0]
    assert tracker.step(e, torch.tensor([0.9])) == [0]
    assert tracker.bank.exist_frames().tolist() == [2.0]
    tracker.step(torch.zeros(0, 2), torch.zeros(0))
    assert tracker.bank.track_ids == [0]  # one miss
    tracker.step(torch.zeros(0, 2), torch.zeros(0))
    assert tracker.bank.track_ids == []  # the second consecutive miss removes it (IDOL: ≥ 10 frames)


def test_class_aware_box_nms_and_top1_fallback():
    box = [10.0, 10.0, 50.0, 50.0]
    boxes = torch.tensor([box, box, box, [60.0, 60.0, 90.0, 90.0]])
    probs = torch.tensor([[0.9, 0.0], [0.0, 0.8], [0.7, 0.0], [0.05, 0.02]])
    # q0 (class 0) and q1 (class 1) overlap fully but differ in class: both kept; q2 (class 0) is
    # suppressed by q0; q3 is under the score threshold 0.1
    assert select_queries(probs, boxes, InferenceConfig()).tolist() == [0, 1]
    assert select_queries(probs, boxes, InferenceConfig(class_aware_nms=False)).tolist() == [0]
    # nothing above 0.1: the single best query (q1, 0.08), without NMS
    low = torch.tensor([[0.05, 0.0], [0.0, 0.08], [0.07, 0.0], [0.05, 0.02]])
    assert select_queries(low, boxes, InferenceConfig()).tolist() == [1]
    assert select_queries(low, boxes, InferenceConfig(top1_fallback=False)).tolist() == []
