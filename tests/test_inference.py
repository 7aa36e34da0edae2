"""Online inference (memory-bank tracking), `pmvis predict` and the boxinst pseudo-mask source.

The model is the tiny config with random weights (saved and re-loaded): its predictions are
arbitrary, so model runs check structure and semantics (sizes, lengths, frames, box containment);
the logic (NMS, bank, association, GT matching) is checked on hand-made inputs.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from pmvis.cli import main
from pmvis.core.errors import PmvisError
from pmvis.core.masks import decode_mask, encode_mask
from pmvis.models.fusion import doob_window
from pmvis.models.sources.base import SourceMasks, VideoInput, build_source, get_source_spec
from pmvis.models.sources.boxinst import BoxInstSourceConfig, assign_frame, mask_box_xyxy, match_to_gt
from pmvis.models.vis import ModelConfig, build_model
from pmvis.models.vis.association import MemoryBank, MemoryBankTracker, associate, bisoftmax, memory_embedding
from pmvis.models.vis.checkpoint import check_compatible, load_model, read_checkpoint, save_checkpoint
from pmvis.models.vis.inference import (
    Detection,
    InferenceConfig,
    Track,
    box_nms,
    check_category_ids,
    mask_iou,
    mask_nms,
    masks_to_frame,
    padded_size,
    predict_video,
    resized_size,
)
from pmvis.platform.data.results_io import load_results, save_results
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis_io import load_dataset_dir
from pmvis.platform.evaluation import evaluate_ytvis
from pmvis.platform.predict import predict_dataset, resolve_category_ids, tracks_to_results

NUM_CLASSES = 5  # the synthetic categories, ids 1..5
# Random weights score every query far below the paper's thresholds: take every query.
# every query, every new track, every class (IDOL's 0.05 class threshold would drop a random model's tracks)
TAKE_ALL = dict(score_threshold=0.0, new_track_score=0.0, class_threshold=0.0, test_short_side=None)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_inference")
    generate_synthetic(out, SynthConfig(videos=2, frames=4, height=64, width=64))
    return out


@pytest.fixture(scope="module")
def dataset(data_dir):
    return load_dataset_dir(data_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random-weight checkpoint recording category ids 1..5 (as training does)."""
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg), cfg, extra={"category_ids": [1, 2, 3, 4, 5]})
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0]


RIGGED_CLASS = 3  # category id 4 (ring)


@pytest.fixture(scope="module")
def rigged_checkpoint(tmp_path_factory):
    """A model rigged to be sure of itself: every query says class 3 (probability sigmoid(6)) and
    every mask covers the whole frame (a large bias on the last dynamic conv)."""
    torch.manual_seed(1)
    cfg = ModelConfig.tiny(num_classes=NUM_CLASSES)
    m = build_model(cfg)
    with torch.no_grad():
        m.transformer.class_heads[-1].weight.zero_()
        bias = m.transformer.class_heads[-1].bias
        bias.fill_(-6.0)
        bias[RIGGED_CLASS] = 6.0
        m.controller.mlp.layers[-1].bias[-1] = 100.0  # the last parameter: the output conv's bias
    path = tmp_path_factory.mktemp("rigged") / "checkpoint.pt"
    save_checkpoint(path, m, cfg, extra={"category_ids": [1, 2, 3, 4, 5]})
    return path


def _frames(t: int = 5, h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _rect(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_the_papers():
    c = InferenceConfig()
    assert (c.chunk_size, c.score_threshold, c.box_nms_threshold, c.mask_nms_threshold) == (10, 0.1, 0.9, 0.5)
    assert (c.memory_length, c.match_threshold, c.new_track_score, c.max_missed) == (3, 0.5, 0.2, 10)
    assert c.test_short_side == 480 and c.device is None
    with pytest.raises(ValueError, match="multiple of the mask stride"):
        InferenceConfig(size_divisibility=6)
    with pytest.raises(ValueError):
        InferenceConfig(typo=1)


def test_resize_and_pad_sizes():
    assert resized_size(720, 1280, InferenceConfig()) == (480, 853)
    assert resized_size(720, 1280, InferenceConfig(test_max_size=640)) == (360, 640)
    assert resized_size(64, 80, InferenceConfig(test_short_side=None)) == (64, 80)
    assert padded_size(480, 853, 32) == (480, 864)


# ----------------------------------------------------------------------------- NMS


def test_box_nms_at_0_9():
    base = torch.tensor([0.0, 0.0, 100.0, 100.0])
    near = torch.tensor([0.0, 0.0, 100.0, 105.0])  # IoU 0.952 > 0.9: suppressed
    apart = torch.tensor([0.0, 0.0, 100.0, 125.0])  # IoU 0.84 with near (0.80 with base) < 0.9: kept
    keep = box_nms(torch.stack([base, near, apart]), torch.tensor([0.5, 0.9, 0.4]), 0.9)
    assert keep.tolist() == [1, 2]  # the higher-scored of the near pair, in descending score
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.9).numel() == 0


def test_mask_nms_at_0_5():
    a = torch.from_numpy(_rect(20, 20, 0, 10, 0, 10))
    b = torch.from_numpy(_rect(20, 20, 0, 10, 2, 12))  # IoU with a = 80/120 = 0.67: suppressed
    c = torch.from_numpy(_rect(20, 20, 0, 10, 5, 15))  # IoU with a = 50/150 = 0.33: kept
    masks = torch.stack([a, b, c])
    assert mask_iou(masks[:1], masks[1:]).squeeze(0).tolist() == pytest.approx([80 / 120, 50 / 150])
    assert mask_nms(masks, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    # b wins when it scores highest; then a (0.67) and c (IoU 70/130 = 0.54) both go
    assert mask_nms(masks, torch.tensor([0.5, 0.9, 0.7]), 0.5).tolist() == [1]
    empty = torch.zeros(2, 20, 20, dtype=torch.bool)
    assert mask_nms(empty, torch.tensor([0.2, 0.3]), 0.5).tolist() == [1, 0]  # empty masks overlap nothing


# ----------------------------------------------------------------------------- bank and association


def test_memory_embedding_is_score_and_time_weighted():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = torch.tensor([0.5, 1.0, 0.25])
    w = s * torch.tensor([1 / 3, 2 / 3, 1.0])  # oldest first
    assert torch.allclose(memory_embedding(e, s, "multiply"), (w[:, None] * e).sum(0) / w.sum())
    w_add = s + torch.tensor([1 / 3, 2 / 3, 1.0])  # IDOL's default: score + temporal weight
    assert torch.allclose(memory_embedding(e, s), (w_add[:, None] * e).sum(0) / w_add.sum())
    bank = MemoryBank(memory_length=3, max_missed=10)
    for k, (emb, sc) in enumerate([([9.0, 9.0], 1.0), *zip(e.tolist(), s.tolist())]):
        bank.add(7, torch.tensor(emb), sc)
    assert torch.allclose(bank.embeddings()[0], memory_embedding(e, s))  # only the last 3 count


def test_bisoftmax_and_greedy_mutual_best():
    d = torch.tensor([[10.0, 0.0], [0.0, 10.0], [7.0, 7.0]])
    t = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    s = bisoftmax(d, t)
    sim = d @ t.T
    assert torch.allclose(s, (sim.softmax(1) + sim.softmax(0)) / 2)
    assert associate(s, 0.5) == [(0, 0), (1, 1)]
    # the highest entry wins first; its row and column are then gone
    m = torch.tensor([[0.9, 0.8], [0.95, 0.1]])
    assert associate(m, 0.5) == [(1, 0), (0, 1)]
    assert associate(m, 0.85) == [(1, 0)]  # 0.8 is not above the threshold
    assert associate(torch.zeros(0, 3), 0.5) == [] and associate(torch.zeros(2, 0), 0.5) == []


def test_tracker_associates_identical_and_starts_new_tracks():
    tracker = MemoryBankTracker(InferenceConfig())
    e1, e2 = torch.tensor([10.0, 0.0, 0.0]), torch.tensor([0.0, 10.0, 0.0])
    # frame 0: a confident detection starts track 0; one with score 0.15 <= 0.2 is discarded
    assert tracker.step(torch.stack([e1, e2]), torch.tensor([0.9, 0.15])) == [0, None]
    # frame 1: the detection identical to track 0 is associated; the dissimilar one (0.3 > 0.2) is new
    assert tracker.step(torch.stack([e2, e1]), torch.tensor([0.3, 0.8])) == [1, 0]
    # frame 2: identical to track 1, whatever its position and score (0.15: matched, not new); an
    # unrelated detection gets exactly 0.5 with track 0 (not above the threshold) and 0.1 is too low
    e3 = torch.tensor([0.0, 0.0, 10.0])
    assert tracker.step(torch.stack([e3, e2]), torch.tensor([0.1, 0.15])) == [None, 1]


def test_tracker_drops_a_track_after_max_missed_frames():
    e = torch.tensor([10.0, 0.0])
    far = torch.tensor([0.0, 10.0])
    # IDOL: a tracklet unmatched for memo_tracklet_frames = 10 frames is removed
    for misses, expect_same in ((9, True), (10, False)):
        tracker = MemoryBankTracker(InferenceConfig(max_missed=10))
        assert tracker.step(e[None], torch.tensor([0.9])) == [0]
        for _ in range(misses):
            tracker.step(torch.zeros(0, 2), torch.zeros(0))
        assert (len(tracker.bank) == 1) == expect_same
        ids = tracker.step(torch.stack([e, far]), torch.tensor([0.9, 0.9]))
        assert ids == ([0, 1] if expect_same else [1, 2])


def test_masks_to_frame_upsamples_crops_and_resizes():
    # a 60×80 frame run natively: padded to 64×96 → stride-4 logits 16×24
    logits = torch.full((1, 16, 24), -10.0)
    logits[0, 2:6, 3:8] = 10.0  # canvas pixels rows 8..24, cols 12..32
    m = masks_to_frame(logits, 4, (60, 80), (60, 80))[0]
    assert m.shape == (60, 80)
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(int(ys.min()) - 8) <= 2 and abs(int(ys.max()) - 23) <= 2
    assert abs(int(xs.min()) - 12) <= 2 and abs(int(xs.max()) - 31) <= 2
    # the same canvas from a 120×160 frame resized by 0.5 comes back at 120×160, scaled ×2
    m2 = masks_to_frame(logits, 4, (60, 80), (120, 160))[0]
    # (±15 %: the ±10 step crosses 0 exactly on a pixel of the aligned 60×80 mask, which drops that
    # boundary row and column there but not at 120×160)
    assert m2.shape == (120, 160) and abs(int(m2.sum()) - 4 * int(m.sum())) <= 0.15 * 4 * int(m.sum())
    assert masks_to_frame(logits[:0], 4, (60, 80), (120, 160)).shape == (0, 120, 160)


# ----------------------------------------------------------------------------- the model


def test_predict_video_structure_and_chunking(model):
    frames = _frames(5, 40, 56)
    model.train()  # predict_video evaluates in eval mode and restores the mode
    tracks = predict_video(model, frames, InferenceConfig(**TAKE_ALL, chunk_size=2))
    assert model.training
    model.eval()
    assert tracks and [t.id for t in tracks] == sorted(t.id for t in tracks)
    for tr in tracks:
        for t, det in tr.detections.items():
            assert 0 <= t < 5 and det.mask["size"] == [40, 56]
            assert det.class_scores.shape == (NUM_CLASSES,) and det.score == pytest.approx(det.class_scores.max())
            x0, y0, x1, y1 = det.box
            assert 0 <= x0 <= x1 <= 56 and 0 <= y0 <= y1 <= 40
        assert tr.score == pytest.approx(tr.mean_class_scores[tr.label])
        assert len(tr.segmentations(5)) == 5
    # one chunk or several: the same detections (eval mode, no cross-image state)
    whole = predict_video(model, frames, InferenceConfig(**TAKE_ALL, chunk_size=10))
    assert sorted(round(d.score, 4) for tr in whole for d in tr.detections.values()) == \
        sorted(round(d.score, 4) for tr in tracks for d in tr.detections.values())
    # resized input (short side 32), masks still at the original size
    small = predict_video(model, frames, InferenceConfig(**{**TAKE_ALL, "test_short_side": 32}))
    assert all(d.mask["size"] == [40, 56] for tr in small for d in tr.detections.values())
    # the paper's thresholds on a random model: at most 10 queries a frame, nothing below 0.1
    for tr in predict_video(model, frames, InferenceConfig(test_short_side=None)):
        assert all(d.score > 0.1 for d in tr.detections.values())
    with pytest.raises(ValueError, match="uint8"):
        predict_video(model, frames.astype(np.float32), InferenceConfig())


def test_a_confident_model_gives_one_track_with_the_papers_thresholds(rigged_checkpoint, dataset):
    """Identical full-frame masks: mask NMS keeps one a frame, and the bank links them into one track."""
    model = load_model(rigged_checkpoint)[0]
    frames = dataset.read_video(1)
    (track,) = predict_video(model, frames, InferenceConfig(test_short_side=48, chunk_size=3))
    assert track.frames == list(range(len(frames)))
    assert all(decode_mask(d.mask).all() for d in track.detections.values())  # full, at 64×64
    assert track.label == RIGGED_CLASS and track.score == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())
    (r,) = predict_dataset(model, dataset, InferenceConfig(test_short_side=None), video_ids=[1], progress=False)
    assert r.category_id == 4 and all(s is not None for s in r.segmentations)


def test_track_results_map_classes_to_category_ids():
    def det(p):
        return Detection(score=max(p), class_scores=np.array(p), box=np.zeros(4), mask=encode_mask(np.ones((4, 4))))

    tr = Track(id=0, detections={1: det([0.2, 0.6]), 3: det([0.4, 0.2])})
    assert tr.label == 1 and tr.score == pytest.approx(0.4)  # mean [0.3, 0.4]
    (r,) = tracks_to_results([tr], video_id=9, length=4, category_ids=[7, 3], cfg=InferenceConfig(multi_class=False))
    assert (r.video_id, r.category_id, r.score) == (9, 3, pytest.approx(0.4))
    assert [s is None for s in r.segmentations] == [True, False, True, False]
    # IDOL's multi-class output (the default): both class means are above 0.05
    both = tracks_to_results([tr], video_id=9, length=4, category_ids=[7, 3])
    assert [(x.category_id, round(x.score, 3)) for x in both] == [(7, 0.3), (3, 0.4)]


def test_predict_dataset_results_are_valid_ytvis(model, dataset, tmp_path):
    results = predict_dataset(model, dataset, InferenceConfig(**TAKE_ALL), category_ids=[1, 2, 3, 4, 5],
                              progress=False)
    assert results and {r.video_id for r in results} == set(dataset.videos)
    for r in results:
        video = dataset.videos[r.video_id]
        assert len(r.segmentations) == video.length and r.category_id in dataset.categories
        assert 0.0 <= r.score <= 1.0
        for s in r.segmentations:
            assert s is None or decode_mask(s).shape == (video.height, video.width)
    save_results(results, tmp_path / "r.json")
    assert len(load_results(tmp_path / "r.json", dataset)) == len(results)  # validated against the GT
    metrics = evaluate_ytvis(dataset, results).metrics
    assert set(metrics) >= {"AP", "AP50", "AR10"}
    only = predict_dataset(model, dataset, InferenceConfig(**TAKE_ALL), category_ids=[1, 2, 3, 4, 5],
                           video_ids=[2], progress=False)
    assert {r.video_id for r in only} == {2}
    with pytest.raises(PmvisError, match=r"video ids \[99\]"):
        predict_dataset(model, dataset, InferenceConfig(), category_ids=[1, 2, 3, 4, 5], video_ids=[99])


def test_category_ids_from_the_checkpoint_or_the_dataset(dataset, caplog):
    assert resolve_category_ids({"extra": {"category_ids": [5, 4, 3, 2, 1]}}, dataset, 5) == [5, 4, 3, 2, 1]
    with caplog.at_level(logging.WARNING, logger="pmvis.platform.predict"):
        assert resolve_category_ids({"extra": {}, "path": "c.pt"}, dataset, 5) == [1, 2, 3, 4, 5]
    assert "records no category_ids" in caplog.text
    with pytest.raises(PmvisError, match="3 category ids .* 5 classes"):
        check_category_ids([1, 2, 3], dataset, 5)
    with pytest.raises(PmvisError, match=r"\[40, 41\] .* not categories of the dataset"):
        check_category_ids([1, 2, 3, 40, 41], dataset, 5)


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    cfg3, cfg5 = ModelConfig.tiny(num_classes=3), ModelConfig.tiny(num_classes=5)
    save_checkpoint(tmp_path / "c3.pt", build_model(cfg3), cfg3)
    with pytest.raises(PmvisError, match="num_classes: checkpoint 3 vs config 5"):
        check_compatible(read_checkpoint(tmp_path / "c3.pt"), cfg5)
    # weights that do not fit the config the file records
    save_checkpoint(tmp_path / "bad.pt", build_model(cfg3), cfg5)
    with pytest.raises(PmvisError, match="weights do not fit"):
        load_model(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- CLI


def test_predict_cli_end_to_end(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    argv = ["predict", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--out", str(out),
            "--set", "test_short_side=null", "--set", "score_threshold=0.0", "--set", "new_track_score=0",
            "--set", "class_threshold=0",
            "--device", "cpu", "--no-progress", "--evaluate"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tracks in 2 videos" in printed and "AP50" in printed
    raw = json.loads(out.read_text())
    assert raw and all(len(r["segmentations"]) == 4 for r in raw)
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary left behind


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "{tmp}/missing.pt"], "missing.pt: checkpoint not found"),
    (["--set", "chunk_size=0"], "chunk_size"),
    (["--set", "typo=1"], "typo"),
    (["--videos", "1,99"], r"ids \[99\]"),
    (["--set", "chunk_size=x"], "chunk_size"),
    *([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []),
])
def test_predict_cli_bad_input_exits_2_and_writes_nothing(checkpoint, data_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "results.json"
    argv = ["predict", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--out", str(out), "--no-progress"]
    assert main(argv + [a.format(tmp=tmp_path) for a in extra]) == 2  # a repeated flag: the last one wins
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_predict_cli_help_and_evaluate_needs_masks(checkpoint, data_dir, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    boxes_only = dataset.to_json()
    for a in boxes_only["annotations"]:
        a["segmentations"] = None
    (tmp_path / "boxes.json").write_text(json.dumps(boxes_only))
    out = tmp_path / "r.json"
    code = main(["predict", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--out", str(out),
                 "--annotations", str(tmp_path / "boxes.json"), "--evaluate", "--no-progress"])
    assert code == 2 and "no masks" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- boxinst source


def test_match_to_gt_same_class_best_giou():
    gt = np.array([[0, 0, 10, 10], [0, 0, 12, 12], [50, 50, 60, 60]], float)
    gt_cat = [1, 2, 1]
    pred = np.array([
        [0, 0, 12, 12],  # identical to GT 1, but that is class 2: goes to GT 0 (class 1)
        [0, 0, 12, 12],  # class 2: GT 1
        [30, 30, 32, 32],  # class 1, between GT 0 and GT 2: GIoU < 0 with both → unmatched
        [52, 52, 58, 58],  # class 3: no GT of its class
    ], float)
    assert match_to_gt(pred, [1, 2, 1, 3], gt, gt_cat).tolist() == [0, 1, -1, -1]
    assert match_to_gt(np.zeros((0, 4)), [], gt, gt_cat).tolist() == []
    assert match_to_gt(pred, [1, 2, 1, 3], np.zeros((0, 4)), []).tolist() == [-1] * 4


def test_assign_frame_unions_doobs_and_takes_the_max_score():
    H, W = 40, 40
    left = _rect(H, W, 10, 20, 8, 16)  # both inside/around GT 7's box
    right = _rect(H, W, 10, 22, 14, 24)  # pokes out of the box at the bottom and right
    other = _rect(H, W, 30, 38, 30, 38)  # class 2: matched to GT 8
    gt = {7: ([8.0, 10.0, 14.0, 10.0], 1), 8: ([30.0, 30.0, 8.0, 8.0], 2), 9: ([0.0, 0.0, 5.0, 5.0], 1)}
    out = assign_frame([left, right, other, np.zeros((H, W), bool)], [1, 1, 2, 1], [0.3, 0.7, 0.5, 0.9], gt)
    assert set(out) == {7, 8}  # GT 9 gets nothing; the empty prediction matches nothing
    mask, conf = out[7]
    expect = (left | right) & _rect(H, W, 10, 20, 8, 22)
    assert np.array_equal(mask, expect) and conf == pytest.approx(0.7)
    assert np.array_equal(out[8][0], other) and out[8][1] == pytest.approx(0.5)
    assert mask_box_xyxy(left) == [8.0, 10.0, 16.0, 20.0] and mask_box_xyxy(np.zeros((3, 3), bool)) is None


def test_boxinst_source_config():
    spec = get_source_spec("boxinst")
    assert spec.uses_model is True and spec.config_cls is BoxInstSourceConfig
    with pytest.raises(PmvisError, match="`checkpoint` is required"):
        build_source("boxinst", {})
    with pytest.raises(PmvisError, match="inference: chunk_size"):
        BoxInstSourceConfig(checkpoint="x.pt", inference={"chunk_size": 0})
    cfg = BoxInstSourceConfig(checkpoint="x.pt")
    assert cfg.inference["mask_nms_threshold"] == 0.5  # completed with the defaults (recorded in manifests)
    with pytest.raises(PmvisError, match="checkpoint not found"):
        build_source("boxinst", {"checkpoint": "/nonexistent/checkpoint.pt"})


def _video_inputs(dataset) -> list[VideoInput]:
    by_video = dataset.annotations_by_video()
    return [VideoInput(video_id=v, frames=dataset.read_video(v), boxes={a.id: a.bboxes for a in by_video[v]},
                       categories={a.id: a.category_id for a in by_video[v]}) for v in sorted(dataset.videos)]


def _check_inside_boxes(video: VideoInput, out: dict[int, SourceMasks]) -> int:
    T, (H, W) = video.length, video.size
    assert set(out) == set(video.boxes)
    n = 0
    for aid, sm in out.items():
        assert len(sm.masks) == T and len(sm.confidences) == T
        for t, (m, c) in enumerate(zip(sm.masks, sm.confidences)):
            assert (m is None) == (c is None)
            if m is None:
                continue
            n += 1
            box = video.boxes[aid][t]
            assert box is not None, "a mask on a frame without a box"
            assert m.dtype == bool and m.shape == (H, W) and m.any() and 0.0 <= c <= 1.0
            x0, y0, x1, y1 = doob_window(box, 0, H, W)
            outside = m.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any(), "mask pixels outside the GT box"
    return n


def test_boxinst_source_runs_the_checkpoint(checkpoint, dataset):
    src = build_source("boxinst", {"checkpoint": str(checkpoint), "inference": TAKE_ALL})
    assert src.category_ids == [1, 2, 3, 4, 5] and src.inference.device == "cpu"
    video = _video_inputs(dataset)[0]
    aid = next(iter(video.boxes))
    video.boxes[aid] = [None] + video.boxes[aid][1:]  # this annotation has no box on frame 0
    out = src(video)
    _check_inside_boxes(video, out)
    assert out[aid].masks[0] is None


def test_boxinst_source_with_a_confident_model(rigged_checkpoint, dataset):
    """Full-frame class-3 predictions: every category-4 annotation gets its filled box (the DOOB of
    a full mask), on its box frames only; the other categories get nothing."""
    src = build_source("boxinst", {"checkpoint": str(rigged_checkpoint), "inference": {"test_short_side": None}})
    for video in _video_inputs(dataset):
        aid0 = next(iter(video.boxes))
        video.boxes[aid0] = [None] + video.boxes[aid0][1:]
        out = src(video)
        _check_inside_boxes(video, out)
        H, W = video.size
        for aid, sm in out.items():
            for t, box in enumerate(video.boxes[aid]):
                if box is None or video.categories[aid] != 4:
                    assert sm.masks[t] is None
                else:
                    x0, y0, x1, y1 = doob_window(box, 0, H, W)
                    assert np.array_equal(sm.masks[t], _rect(H, W, y0, y1, x0, x1))
                    assert sm.confidences[t] == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())


def test_boxinst_source_matches_tracks_to_gt(checkpoint, dataset, monkeypatch):
    """Hand-made tracks in place of the model: union, DOOB, same class, box frames only."""
    import pmvis.models.vis.inference as inference

    video = _video_inputs(dataset)[0]
    T, (H, W) = video.length, video.size
    aid, boxes = next(iter(video.boxes.items()))
    cat = video.categories[aid]
    cls = cat - 1  # category_ids [1..5]
    video.boxes[aid] = [None] + boxes[1:]

    def detection(mask, p):
        probs = np.full(NUM_CLASSES, 0.01)
        probs[cls] = p
        return Detection(score=p, class_scores=probs, box=np.zeros(4), mask=encode_mask(mask))

    def fake_predict(model, frames, cfg):
        tracks = [Track(id=0), Track(id=1), Track(id=2)]
        for t in range(T):
            x, y, w, h = boxes[t]
            cx, cy = int(x + w / 2), int(y + h / 2)
            grown = _rect(H, W, max(int(y) - 2, 0), cy + 2, max(int(x) - 2, 0), cx + 2)  # top-left, spills out
            half = _rect(H, W, cy, int(y + h), cx, int(x + w))  # bottom-right quarter
            tracks[0].detections[t] = detection(grown, 0.4)
            tracks[1].detections[t] = detection(half, 0.6)
        wrong = np.full(NUM_CLASSES, 0.01)
        wrong[(cls + 1) % NUM_CLASSES] = 0.9  # another class on the same box: never assigned to aid
        tracks[2].detections[1] = Detection(score=0.9, class_scores=wrong, box=np.zeros(4),
                                            mask=encode_mask(_rect(H, W, *[int(v) for v in (
                                                boxes[1][1], boxes[1][1] + boxes[1][3],
                                                boxes[1][0], boxes[1][0] + boxes[1][2])])))
        return tracks

    monkeypatch.setattr(inference, "predict_video", fake_predict)
    src = build_source("boxinst", {"checkpoint": str(checkpoint)})
    out = src(video)
    assert _check_inside_boxes(video, out) >= T - 1
    assert out[aid].masks[0] is None  # no box on frame 0
    for t in range(1, T):
        x, y, w, h = boxes[t]
        cx, cy = int(x + w / 2), int(y + h / 2)
        x0, y0, x1, y1 = doob_window(boxes[t], 0, H, W)
        expect = _rect(H, W, max(int(y) - 2, 0), cy + 2, max(int(x) - 2, 0), cx + 2) | \
            _rect(H, W, cy, int(y + h), cx, int(x + w))
        expect &= _rect(H, W, y0, y1, x0, x1)
        assert np.array_equal(out[aid].masks[t], expect), t
        assert out[aid].confidences[t] == pytest.approx(0.6)  # max of 0.4 and 0.6; the 0.9 is another class


@pytest.mark.parametrize("stride", [2, 4])
def test_upsampled_mask_cells_sit_on_the_pixels_their_targets_were_sampled_at(stride):
    """A cell's value lands on pixel (i·s + s//2, j·s + s//2), where ``mask_targets`` sampled it: a
    plain ×s bilinear upsampling put it half a pixel up-left (the masks shifted against training)."""
    from pmvis.models.vis.targets import mask_targets

    logits = torch.full((1, 6, 8), -1.0)
    logits[0, 2, 5] = 1.0
    m = masks_to_frame(logits, stride, (6 * stride, 8 * stride), (6 * stride, 8 * stride))[0]
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert ys.float().mean() == 2 * stride + stride // 2 and xs.float().mean() == 5 * stride + stride // 2
    # a mask sampled to the stride and brought back keeps its place (no drift up-left)
    full = torch.zeros(1, 12 * stride, 16 * stride)
    full[0, 3 * stride:9 * stride, 4 * stride:12 * stride] = 1.0
    back = masks_to_frame(mask_targets(full, stride) * 20 - 10, stride, full.shape[-2:], full.shape[-2:])[0]
    ys, xs = torch.nonzero(back, as_tuple=True)
    (y0, x0), (y1, x1) = (full[0].nonzero().float().mean(0).tolist(), [ys.float().mean(), xs.float().mean()])
    assert abs(float(y1) - y0) <= 0.5 and abs(float(x1) - x0) <= 0.5
