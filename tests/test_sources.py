"""The built-in pseudo-mask sources: grabcut, hqsam, track (sam2; deaot when a checkout is given).

Models run with random (seeded) weights: no checkpoint can be downloaded here. SAM 2 runs at a
128² input (``++model.image_size=128``) to keep the file fast on 2 CPU cores; HQ-SAM has a fixed
1024² input (~1 s a frame for vit_tiny).
"""

from __future__ import annotations

import copy
import os

import cv2
import numpy as np
import pytest
import torch

from pmvis.core.errors import PmvisError
from pmvis.core.masks import encode_mask
from pmvis.models.sources.base import SourceMasks, VideoInput, build_source, get_source_spec
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis_io import load_ytvis
from pmvis.platform.predict import filled_box_results
from pmvis.platform.spatiotemporal_iou import mask_quality

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*RANDOM weights.*:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Overwriting tiny_vit:UserWarning"),
]

SAM2_TEST_OVERRIDES = ["++model.image_size=128"]


def _videos(ds) -> list[VideoInput]:
    by_video = ds.annotations_by_video()
    return [VideoInput(video_id=vid, frames=ds.read_video(vid), boxes={a.id: a.bboxes for a in by_video[vid]},
                       categories={a.id: a.category_id for a in by_video[vid]})
            for vid in sorted(ds.videos)]


def _with_init(video: VideoInput, init: dict[int, SourceMasks]) -> VideoInput:
    return VideoInput(video_id=video.video_id, frames=video.frames, boxes=video.boxes,
                      categories=video.categories, init_masks=init)


def _check_contract(video: VideoInput, out: dict[int, SourceMasks], *, every_box_frame: bool = True) -> None:
    T, (H, W) = video.length, video.size
    assert set(out) == set(video.boxes)
    for aid, sm in out.items():
        assert len(sm.masks) == T and len(sm.confidences) == T
        for t, (m, c) in enumerate(zip(sm.masks, sm.confidences)):
            assert (m is None) == (c is None), (aid, t)
            if m is not None:
                assert isinstance(m, np.ndarray) and m.dtype == bool and m.shape == (H, W), (aid, t)
                assert isinstance(c, float) and 0.0 <= c <= 1.0, (aid, t, c)
            if every_box_frame and video.boxes[aid][t] is not None:
                assert m is not None, (aid, t)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_small")
    generate_synthetic(out, SynthConfig(videos=2, frames=3, height=64, width=80, seed=1))
    ds = load_ytvis(out / "annotations.json")
    return ds, _videos(ds)


@pytest.fixture(scope="module")
def hqsam(small):
    return build_source("hqsam", {})


@pytest.fixture(scope="module")
def hqsam_outputs(small, hqsam):
    return [hqsam(v) for v in small[1]]


@pytest.fixture(scope="module")
def track(small):
    return build_source("track", {"sam2_overrides": SAM2_TEST_OVERRIDES})


# ----------------------------------------------------------------------------- registry / contract


def test_builtin_sources_registered():
    assert get_source_spec("grabcut").uses_model is False
    assert get_source_spec("hqsam").uses_model is True
    spec = get_source_spec("track")
    assert spec.uses_model is True and spec.needs_init_from == "hqsam"
    with pytest.raises(PmvisError, match="model_type"):
        build_source("hqsam", {"model_type": "vit_x"})


def test_grabcut_contract(small):
    src = build_source("grabcut", {})
    for video in small[1]:
        out = src(video)
        _check_contract(video, out)
        again = src(video)  # deterministic
        for aid in out:
            for a, b in zip(out[aid].masks, again[aid].masks):
                assert (a is None and b is None) or np.array_equal(a, b)


def test_hqsam_contract(small, hqsam_outputs):
    for video, out in zip(small[1], hqsam_outputs):
        _check_contract(video, out)
        for aid, sm in out.items():  # masks only where there is a box
            assert all((m is None) == (b is None) for m, b in zip(sm.masks, video.boxes[aid]))


def test_track_contract(small, hqsam_outputs, track):
    # Presence is the tracker's call (random weights here), so a box frame may get None; every
    # tracked instance has its key-frame mask, and masks on frames without a box are allowed.
    for video, init in zip(small[1], hqsam_outputs):
        video = _with_init(video, init)
        out = track(video)
        _check_contract(video, out, every_box_frame=False)
        keys = track.key_frames(video)
        assert set(keys) == {aid for aid, b in video.boxes.items() if any(x is not None for x in b)}
        for aid, k in keys.items():
            assert k.from_init and out[aid].masks[k.frame] is not None


# ----------------------------------------------------------------------------- grabcut


def test_grabcut_beats_filled_box(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_grabcut")
    generate_synthetic(out, SynthConfig(videos=4, frames=4, height=96, width=128, seed=0))
    ds, truth = load_ytvis(out / "annotations.json"), load_ytvis(out / "truth.json")
    src = build_source("grabcut", {})
    predicted = []
    for video in _videos(ds):
        res = src(video)
        for a in ds.annotations_by_video()[video.video_id]:
            p = copy.copy(a)
            p.segmentations = [None if m is None else encode_mask(m) for m in res[a.id].masks]
            predicted.append(p)
    baseline = []
    for a, r in zip(ds.annotations, filled_box_results(ds)):
        b = copy.copy(a)
        b.segmentations = r.segmentations
        baseline.append(b)
    q_grabcut, q_box = mask_quality(predicted, truth).mean, mask_quality(baseline, truth).mean
    print(f"mean spatio-temporal IoU: grabcut {q_grabcut:.3f}, filled box {q_box:.3f}")
    assert q_grabcut > q_box + 0.05


def test_grabcut_fallbacks():
    from pmvis.models.sources.grabcut import GrabCutConfig, grabcut_mask

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    img[10:30, 15:35] = (250, 20, 20)
    cfg = GrabCutConfig()
    m, c = grabcut_mask(img, [14.0, 9.0, 22.0, 22.0], cfg)
    assert c == 1.0 and m[15:25, 20:30].all() and not m[:5].any()
    for box in ([10.0, 10.0, 1.4, 20.0], [0.0, 0.0, 50.0, 40.0], [49.0, 5.0, 1.0, 1.0]):
        m, c = grabcut_mask(img, box, cfg)  # degenerate, or no background sample left
        x0, y0 = int(round(box[0])), int(round(box[1]))
        x1, y1 = int(round(box[0] + box[2])), int(round(box[1] + box[3]))
        expect = np.zeros((40, 50), bool)
        expect[y0:y1, x0:x1] = True
        assert c == 0.0 and np.array_equal(m, expect), box


# ----------------------------------------------------------------------------- hqsam


def _frame_boxes(video: VideoInput, t: int) -> tuple[list[int], np.ndarray]:
    ids = [aid for aid, b in video.boxes.items() if b[t] is not None]
    return ids, np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (video.boxes[a][t] for a in ids)])


def test_hqsam_batched_equals_one_box_at_a_time(small, hqsam, hqsam_outputs):
    """Batching changes nothing: the source's masks are what ``SamPredictor.predict`` gives for one
    box at a time with the same weights. A matmul over a batch of boxes may round differently from
    one over a single box, so a pixel whose logit is within float noise of 0 may flip: such pixels
    are counted and printed, any other difference fails."""
    from segment_anything_hq import SamPredictor

    predictor = SamPredictor(hqsam.model)  # same (random, seeded) weights, a fresh predictor
    video, out = small[1][0], hqsam_outputs[0]
    busiest = max(range(video.length), key=lambda t: len(_frame_boxes(video, t)[0]))
    compared = flipped = 0
    max_logit_diff = 0.0
    for t in range(video.length):
        ids, xyxy = _frame_boxes(video, t)
        if not ids:
            continue
        predictor.set_image(video.frames[t])
        one_box = [predictor.predict(box=xyxy[k], multimask_output=False, hq_token_only=False, return_logits=True)
                   for k in range(len(ids))]
        for aid, (logits, ious, _) in zip(ids, one_box):
            differ = out[aid].masks[t] != (logits[0] > hqsam.model.mask_threshold)
            assert np.all(np.abs(logits[0][differ]) < 1e-3), (aid, t)  # only float-noise pixels may flip
            flipped += int(differ.sum())
            assert out[aid].confidences[t] == pytest.approx(float(np.clip(ious[0], 0, 1)), abs=1e-5)
            compared += 1
        if t == busiest:  # the low-res logits themselves, for the frame with the most boxes
            _, _, batched_logits = hqsam.predict_frame(video.frames[t], xyxy)
            max_logit_diff = max(float(np.abs(batched_logits[k] - low[0]).max())
                                 for k, (_, _, low) in enumerate(one_box))
    print(f"{compared} boxes: {flipped} mask pixels differ from one-box-at-a-time predict; frame {busiest}: "
          f"{len(_frame_boxes(video, busiest)[0])} boxes in one call, max |low-res logit| difference {max_logit_diff:.2e}")
    assert len(_frame_boxes(video, busiest)[0]) >= 2
    assert max_logit_diff < 1e-4


def test_hqsam_checkpoint_roundtrip_and_errors(small, hqsam, hqsam_outputs, tmp_path):
    video, out = small[1][0], hqsam_outputs[0]
    t = max(range(video.length), key=lambda t: len(_frame_boxes(video, t)[0]))
    ids, xyxy = _frame_boxes(video, t)

    path = tmp_path / "sam_hq_vit_tiny_random.pth"
    torch.save(hqsam.model.state_dict(), path)
    loaded = build_source("hqsam", {"checkpoint": str(path), "random_init_seed": 123})  # seed must not matter
    masks, iou, _ = loaded.predict_frame(video.frames[t], xyxy)
    for k, aid in enumerate(ids):  # the same computation on the same weights: bit-identical
        assert np.array_equal(masks[k], out[aid].masks[t])
        assert float(np.clip(iou[k], 0, 1)) == out[aid].confidences[t]

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(PmvisError, match=str(corrupt)):
        build_source("hqsam", {"checkpoint": str(corrupt)})
    with pytest.raises(PmvisError, match="not found"):
        build_source("hqsam", {"checkpoint": str(tmp_path / "missing.pth")})

    from segment_anything_hq import sam_model_registry

    other = tmp_path / "sam_hq_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), other)
    with pytest.raises(PmvisError, match="does not fit this model") as e:
        build_source("hqsam", {"checkpoint": str(other)})
    assert str(other) in str(e.value)


def test_hqsam_random_weights_warn_loudly_and_device_checked():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        build_source("hqsam", {})
    if not torch.cuda.is_available():
        with pytest.raises(PmvisError, match="CUDA is not available"):
            build_source("hqsam", {"device": "cuda"})


# ----------------------------------------------------------------------------- track: key frames


def test_select_key_frame_follows_init_confidence():
    from pmvis.models.sources.propagate import group_by_key_frame, select_key_frame

    H, W = 10, 12
    a, empty = np.zeros((H, W), bool), np.zeros((H, W), bool)
    a[2:5, 3:7] = True
    boxes = [[3, 2, 4, 3], [0, 0, 12, 10], [3, 2, 4, 3], None]
    init = SourceMasks(masks=[a, empty, a.copy(), None], confidences=[0.6, 0.99, 0.8, None])
    k = select_key_frame(init, boxes, H, W)
    assert (k.frame, k.from_init, k.confidence) == (2, True, 0.8)  # the empty mask at 0.99 is not usable
    tie = SourceMasks(masks=[a, a, None, None], confidences=[0.7, 0.7, None, None])
    assert select_key_frame(tie, boxes, H, W).frame == 0  # earliest on ties

    # No usable init mask: the filled box on the frame with the largest box.
    for no_init in (None, SourceMasks(masks=[empty, None, None, None], confidences=[0.9, None, None, None])):
        k = select_key_frame(no_init, boxes, H, W)
        assert (k.frame, k.from_init, k.confidence) == (1, False, None) and k.mask.all()
    assert select_key_frame(None, [None, None], H, W) is None
    with pytest.raises(PmvisError, match="shape"):
        select_key_frame(SourceMasks(masks=[np.ones((3, 3), bool)], confidences=[0.5]), [None], H, W)
    with pytest.raises(PmvisError, match="cover 1 frames"):
        select_key_frame(SourceMasks(masks=[a], confidences=[0.5]), boxes, H, W)

    keys = {7: select_key_frame(init, boxes, H, W), 8: select_key_frame(None, boxes, H, W),
            9: select_key_frame(SourceMasks([None, None, a, None], [None, None, 0.3, None]), boxes, H, W)}
    groups = group_by_key_frame(keys)
    assert [(f, list(objs)) for f, objs in groups] == [(1, [8]), (2, [9, 7])]  # ascending confidence


def test_track_source_seeds_tracker_from_key_frames():
    from pmvis.models.sources.propagate import PropagationConfig, PropagationSource

    class Recorder:
        def propagate(self, frames, groups):
            self.groups = groups
            T = len(frames)
            return {aid: ([m] * T, [0.75] * T) for _, objs in groups for aid, m in objs.items()}

    T, H, W = 4, 8, 8
    m = np.zeros((H, W), bool)
    m[1:4, 1:4] = True
    video = VideoInput(
        video_id=3, frames=np.zeros((T, H, W, 3), np.uint8),
        boxes={1: [[1, 1, 3, 3]] * T, 2: [None, [0, 0, 8, 8], None, None], 3: [None] * T},
        init_masks={1: SourceMasks([m, m, m, None], [0.2, 0.9, 0.5, None])},
    )
    rec = Recorder()
    out = PropagationSource(PropagationConfig(), propagator=rec)(video)
    assert [(f, sorted(objs)) for f, objs in rec.groups] == [(1, [1, 2])]
    assert np.array_equal(rec.groups[0][1][1], m) and rec.groups[0][1][2].all()
    assert out[3].masks == [None] * T and out[1].confidences == [0.75] * T
    _check_contract(video, out, every_box_frame=False)


# ----------------------------------------------------------------------------- track: sam2


def test_sam2_memory_feed_matches_sam2_loader(small, track, tmp_path):
    from sam2.utils.misc import load_video_frames_from_jpg_images

    from pmvis.models.sources.propagators import sam2_init_state

    frames = small[1][0].frames
    for t, f in enumerate(frames):  # lossless frames: PNG bytes (PIL reads by content, sam2 wants *.jpg)
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(f[..., ::-1]))
        (tmp_path / f"{t:05d}.jpg").write_bytes(buf.tobytes())
    predictor = track.propagator.predictor
    ref, h, w = load_video_frames_from_jpg_images(str(tmp_path), predictor.image_size, offload_video_to_cpu=True,
                                                  compute_device=torch.device("cpu"))
    state = sam2_init_state(predictor, frames, "memory")
    assert (state["video_height"], state["video_width"], state["num_frames"]) == (h, w, len(frames))
    for t in range(len(frames)):
        assert torch.equal(state["images"][t], ref[t])
    jpeg = sam2_init_state(predictor, frames, "jpeg")  # the documented path, through a temp folder
    assert jpeg["images"].shape == ref.shape
    assert float((jpeg["images"] - ref).abs().mean()) < 0.05  # JPEG q100 vs lossless


def test_sam2_tracks_forward_and_backward(small, hqsam_outputs, track, monkeypatch):
    predictor = track.propagator.predictor
    calls, original = [], predictor.propagate_in_video

    def spy(state, start_frame_idx=None, reverse=False, **kw):
        for item in original(state, start_frame_idx=start_frame_idx, reverse=reverse, **kw):
            calls.append((start_frame_idx, reverse, item[0]))
            yield item

    monkeypatch.setattr(predictor, "propagate_in_video", spy)
    video = small[1][0]
    H, W = video.size
    aid = next(iter(video.boxes))
    m = np.zeros((H, W), bool)
    m[20:40, 30:50] = True
    init = {aid: SourceMasks([None, m, None], [None, 0.9, None])}  # key frame 1: the middle
    out = track(_with_init(VideoInput(video.video_id, video.frames, {aid: video.boxes[aid]}), init))
    forward = [t for s, r, t in calls if not r]
    backward = [t for s, r, t in calls if r]
    assert forward == [1, 2] and backward == [1, 0]
    assert {s for s, _, _ in calls} == {1}
    masks = out[aid].masks
    assert masks[1] is not None and masks[1][25:35, 35:45].all()  # the key frame keeps its mask
    # The (random-weight) tracker reports the object present before and after the key frame.
    assert masks[0] is not None and masks[2] is not None
    assert all(0.5 < c <= 1.0 for c in out[aid].confidences)


def test_sam2_checkpoint_roundtrip_and_errors(small, track, tmp_path):
    video = small[1][0]
    H, W = video.size
    m = np.zeros((H, W), bool)
    m[10:30, 20:50] = True
    groups = [(1, {5: m})]
    ref = track.propagator.propagate(video.frames, groups)
    path = tmp_path / "sam2_random.pt"
    torch.save({"model": track.propagator.predictor.state_dict()}, path)
    loaded = build_source("track", {"sam2_overrides": SAM2_TEST_OVERRIDES, "checkpoint": str(path),
                                    "random_init_seed": 7})
    out = loaded.propagator.propagate(video.frames, groups)
    for a, b in zip(out[5][0], ref[5][0]):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert out[5][1] == ref[5][1]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PmvisError, match=str(bad)):
        build_source("track", {"sam2_overrides": SAM2_TEST_OVERRIDES, "checkpoint": str(bad)})
    with pytest.raises(PmvisError, match="sam2_config"):
        build_source("track", {"sam2_config": "configs/nope.yaml"})


# ----------------------------------------------------------------------------- track: deaot


def test_deaot_without_checkout_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PMVIS_DEAOT_ROOT", raising=False)
    with pytest.raises(PmvisError, match="PMVIS_DEAOT_ROOT"):
        build_source("track", {"engine": "deaot"})
    with pytest.raises(PmvisError, match="not an aot-benchmark checkout"):
        build_source("track", {"engine": "deaot", "deaot_root": str(tmp_path)})


_FAKE_AOT = {
    "configs/__init__.py": "",
    "configs/models/__init__.py": "",
    "configs/models/r50_deaotl.py": "class ModelConfig:\n    pass\n",
    "configs/default.py": """
import importlib

class DefaultEngineConfig:
    def __init__(self, exp_name='default', model='aott'):
        importlib.import_module('configs.models.' + model.lower())
        self.MODEL_VOS, self.MODEL_ENGINE = 'deaot', 'deaotengine'
        self.TEST_LONG_TERM_MEM_GAP, self.MODEL_ALIGN_CORNERS = 5, True
""",
    "networks/__init__.py": "",
    "networks/models/__init__.py": """
import torch

class FakeDeAOT(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.w = cfg, torch.nn.Parameter(torch.zeros(2))

def build_vos_model(name, cfg):
    assert name == 'deaot'
    return FakeDeAOT(cfg)
""",
    "networks/engines/__init__.py": """
import torch
import torch.nn.functional as F

class FakeEngine:  # 'tracks' by carrying the last label map forward; records the calls
    calls = []

    def __init__(self, aot_model, gpu_id=0, long_term_mem_gap=9999):
        self.restart_engine()

    def restart_engine(self):
        self.label = None
        FakeEngine.calls.append('restart')

    def add_reference_frame(self, img, mask, frame_step=-1, obj_nums=None):
        assert img.shape[2:] == mask.shape[2:] and frame_step == 0
        self.label, self.n, self.input_size_2d = mask, obj_nums[0], tuple(img.shape[2:])
        FakeEngine.calls.append(('ref', self.n))

    def match_propogate_one_frame(self, img=None):
        assert tuple(img.shape[2:]) == self.input_size_2d
        FakeEngine.calls.append('step')

    def decode_current_logits(self, output_size=None):
        onehot = F.one_hot(self.label[:, 0].long(), self.n + 1).permute(0, 3, 1, 2).float() * 10
        return F.interpolate(onehot, size=output_size, mode='nearest')

    def update_memory(self, curr_mask):
        assert tuple(curr_mask.shape[2:]) == self.input_size_2d
        self.label = curr_mask

def build_engine(name, phase='train', **kwargs):
    assert name == 'deaotengine' and phase == 'eval'
    return FakeEngine(**kwargs)
""",
}


def test_deaot_adapter_with_a_fake_checkout(tmp_path):
    """The adapter's plumbing (import, config, weights, both directions, outputs) against a stand-in
    checkout whose engine carries the reference label map forward unchanged."""
    import sys

    root = tmp_path / "aot-benchmark"
    for rel, text in _FAKE_AOT.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    try:
        ckpt = tmp_path / "deaot.pth"
        torch.save({"state_dict": {"module.w": torch.tensor([1.0, 2.0])}}, ckpt)
        src = build_source("track", {"engine": "deaot", "deaot_root": str(root), "deaot_checkpoint": str(ckpt)})
        assert torch.equal(src.propagator.model.w.detach(), torch.tensor([1.0, 2.0]))
        with pytest.raises(PmvisError, match="no DeAOT model config"):
            build_source("track", {"engine": "deaot", "deaot_root": str(root), "deaot_config": "nope"})
        T, H, W = 4, 65, 81  # already a valid DeAOT input size: no resampling, so the fake carries masks exactly
        a, b = np.zeros((H, W), bool), np.zeros((H, W), bool)
        a[10:30, 10:40] = True
        b[35:60, 45:75] = True
        video = VideoInput(video_id=1, frames=np.zeros((T, H, W, 3), np.uint8),
                           boxes={1: [[10, 10, 30, 20]] * T, 2: [None, None, [45, 35, 30, 25], None]},
                           init_masks={1: SourceMasks([None, a, a, None], [None, 0.9, 0.5, None]),
                                       2: SourceMasks([None, None, b, None], [None, None, 0.8, None])})
        engines = sys.modules["networks.engines"]
        engines.FakeEngine.calls.clear()
        out = src(video)
        _check_contract(video, out, every_box_frame=False)
        assert src.propagator.input_size(H, W) == (65, 81) == src.propagator.input_size(64, 80)  # 16k + 1
        assert max(src.propagator.input_size(720, 1280)) <= 1040 + 16
        for aid, m, key in ((1, a, 1), (2, b, 2)):
            assert out[aid].masks[key] is m or np.array_equal(out[aid].masks[key], m)
            assert out[aid].confidences[key] == 1.0
            for t in range(T):  # forward and backward from the key frame, the mask carried along
                assert np.array_equal(out[aid].masks[t], m), (aid, t)
                assert 0.99 < out[aid].confidences[t] <= 1.0
        # two groups (key frames 1 and 2), each: forward pass then backward pass, one object each
        steps = engines.FakeEngine.calls
        assert steps.count(("ref", 1)) == 4 and steps.count("step") == (2 + 1) + (1 + 2)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in ("configs", "networks")]:
            del sys.modules[name]
        if str(root.resolve()) in sys.path:
            sys.path.remove(str(root.resolve()))


@pytest.mark.skipif(not os.environ.get("PMVIS_DEAOT_ROOT"),
                    reason="set PMVIS_DEAOT_ROOT to an aot-benchmark checkout to run the DeAOT engine")
def test_deaot_engine_runs(small, hqsam_outputs):
    src = build_source("track", {"engine": "deaot"})  # random weights unless deaot_checkpoint is given
    for video, init in zip(small[1], hqsam_outputs):
        v = _with_init(video, init)
        out = src(v)
        _check_contract(v, out, every_box_frame=False)
        for aid, k in src.key_frames(v).items():
            assert np.array_equal(out[aid].masks[k.frame], k.mask)


def test_pseudo_masks_benchmark_runs():
    """The source-level benchmark stays runnable and its three ways agree (tiny size)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudo_masks.py"
    spec = importlib.util.spec_from_file_location("bench_pseudo_masks", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run_hqsam(frames=1, boxes=2, size=(64, 80), warmup=False)
    print(bench.report(r))
    assert r["boxes"] >= 2 and bench.masks_agree(r)


# ----------------------------------------------------------------------------- track: flow


def _textured_disc_video(T: int = 8, H: int = 96, W: int = 112, step: int = 3, absent: tuple[int, ...] = (),
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc gliding right by ``step`` px a frame over a textured background; the disc's
    texture moves with it (as an object's does), so optical flow can follow it. Frames in ``absent``
    show the background only. Returns (frames (T, H, W, 3) uint8, true masks (T, H, W) bool)."""
    rng = np.random.default_rng(seed)
    bg = cv2.GaussianBlur(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), (0, 0), 2.0)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (H, W + T * step, 3), dtype=np.uint8), (0, 0), 1.5)
    tex = np.clip(tex.astype(np.int16) // 2 + 128, 0, 255).astype(np.uint8)  # brighter than the background
    yy, xx = np.mgrid[0:H, 0:W]
    frames, masks = np.empty((T, H, W, 3), np.uint8), np.zeros((T, H, W), bool)
    for t in range(T):
        cx, cy, r = 30 + step * t, H // 2, 18
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        frames[t] = bg
        if t in absent:
            continue
        shifted = tex[:, T * step - step * t:T * step - step * t + W]  # texture glued to the disc
        frames[t][disc] = shifted[disc]
        masks[t] = disc
    return frames, masks


def _disc_track(frames: np.ndarray, masks: np.ndarray, key: int, **config):
    from pmvis.models.sources.propagate import PropagationConfig, PropagationSource

    T = len(frames)
    boxes = [None if not m.any() else [float(np.nonzero(m)[1].min()), float(np.nonzero(m)[0].min()),
                                       float(np.ptp(np.nonzero(m)[1]) + 1), float(np.ptp(np.nonzero(m)[0]) + 1)]
             for m in masks]
    init = [None] * T
    init[key] = masks[key]
    video = VideoInput(video_id=1, frames=frames, boxes={7: boxes},
                       init_masks={7: SourceMasks(init, [None if m is None else 0.9 for m in init])})
    out = PropagationSource(PropagationConfig(engine="flow", **config))(video)
    _check_contract(video, out, every_box_frame=False)
    return out[7]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_flow_tracker_follows_a_moving_textured_disc():
    frames, masks = _textured_disc_video()
    out = _disc_track(frames, masks, key=3)
    ious = [_iou(m, masks[t]) if m is not None else 0.0 for t, m in enumerate(out.masks)]
    print("flow IoU per frame:", np.round(ious, 3).tolist(), "confidence:", out.confidences)
    assert min(ious) > 0.85, ious  # forward (4..7) and backward (0..2) from the key frame
    assert all(c is not None and c > 0.7 for c in out.confidences), out.confidences
    # a standing copy of the key mask is far worse: the flow really moved it
    assert _iou(masks[3], masks[0]) < 0.6 and _iou(masks[3], masks[7]) < 0.6


def test_flow_tracker_follows_a_disc_that_moves_more_than_its_size_per_frame():
    frames, masks = _textured_disc_video(T=5, W=240, step=40)  # 37 px disc, 40 px a frame
    out = _disc_track(frames, masks, key=2)
    ious = [_iou(m, masks[t]) if m is not None else 0.0 for t, m in enumerate(out.masks)]
    print("flow + template matching IoU per frame:", np.round(ious, 3).tolist(), "confidence:", out.confidences)
    assert min(ious) > 0.85, ious
    assert all(c is not None and c > 0.7 for c in out.confidences), out.confidences
    # dense flow alone (no template-matching move) loses it after the key frame
    plain = _disc_track(frames, masks, key=2, flow_search=0)
    lost = [_iou(m, masks[t]) if m is not None else 0.0 for t, m in enumerate(plain.masks) if t != 2]
    assert max(lost) < 0.5, lost


def test_flow_tracker_gives_low_confidence_where_the_object_is_absent():
    frames, masks = _textured_disc_video(absent=(6, 7))
    out = _disc_track(frames, masks, key=2)
    present = [out.confidences[t] for t in range(6)]
    assert all(c is not None and c > 0.7 for c in present), out.confidences
    for t in (6, 7):  # no mask, or one whose confidence is below every present frame's
        assert out.masks[t] is None or out.confidences[t] < min(present), (t, out.confidences)
    # without the box check (boxes are None on the absent frames) the flow and appearance still tell
    frames_b, masks_b = _textured_disc_video(absent=(7,), seed=1)
    low = _disc_track(frames_b, masks_b, key=0, flow_present_threshold=0.0)
    assert low.confidences[7] is not None and low.confidences[7] < 0.5 * min(low.confidences[:7]), low.confidences


def test_flow_engine_builds_without_weights():
    source = build_source("track", {"engine": "flow", "init_from": "grabcut"})
    assert source.config.engine == "flow"
