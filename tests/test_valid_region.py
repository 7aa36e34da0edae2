"""Normalised coordinates are relative to each image's own valid (unpadded) region (Deformable
DETR's valid ratios): a clip's targets and the model's outputs on it do not depend on the canvas it
was padded onto, i.e. on the other clips of its batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmvis.models.vis import ModelConfig, build_model
from pmvis.models.vis.inference import InferenceConfig, predict_video
from pmvis.platform.data.clips import ClipBatch, ClipSampler, _Frame

STRIDE = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clip(height: int, width: int, seed: int) -> list[_Frame]:
    """Two random frames of ``height`` × ``width`` with two boxed instances each."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(2):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        boxes = [[2.0 + t, 3.0, width * 0.6, height * 0.7], [width * 0.3, height * 0.25 + t, width - 1.5, height - 2.0]]
        frames.append(_Frame(image=image, labels=[0, 1], boxes=boxes, ids=[1, 2], gt=None, pseudo=None,
                             pseudo_w=None))
    return frames


def _collate(clips: list[list[_Frame]]) -> ClipBatch:
    sampler = SimpleNamespace(cfg=SimpleNamespace(size_divisibility=32), stride=STRIDE)
    return ClipSampler.collate(sampler, clips, list(range(len(clips))), [[0, 1]] * len(clips),
                               [False] * len(clips))


def _alone_and_batched() -> tuple[ClipBatch, ClipBatch, tuple[int, int]]:
    """The 40×56 clip alone (canvas 64×64) and second in a batch after a 96×80 clip (canvas 96×96)."""
    small, large = _clip(40, 56, seed=0), _clip(96, 80, seed=1)
    alone, batched = _collate([small]), _collate([large, small])
    assert alone.image_size == (64, 64) and batched.image_size == (96, 96)
    return alone, batched, (40, 56)


def test_targets_do_not_depend_on_the_canvas():
    alone, batched, (h, w) = _alone_and_batched()
    hs, ws = h // STRIDE, w // STRIDE
    for t in range(2):
        a, b = alone.labels[0][t], batched.labels[1][t]
        torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=0)
        # image-normalised: the box of frame 0's first instance, x 2..33.6 of 56, y 3..28 of 40
    torch.testing.assert_close(alone.labels[0][0].boxes[0],
                               torch.tensor([(2 + 33.6) / 2 / 56, (3 + 28) / 2 / 40, 31.6 / 56, 25 / 40]))
    ta = alone.targets("cpu", bottom_pixels=10)[0]
    tb = batched.targets("cpu", bottom_pixels=10)[1]
    for fa, fb in zip(ta, tb):
        assert torch.equal(fa.boxes, fb.boxes)
        assert fa.box_masks.sum() > 0
        assert torch.equal(fa.box_masks[:, :hs, :ws], fb.box_masks[:, :hs, :ws])
        assert not fa.box_masks[:, hs:].any() and not fa.box_masks[:, :, ws:].any()
        assert not fb.box_masks[:, hs:].any() and not fb.box_masks[:, :, ws:].any()
        assert torch.equal(fa.valid[:hs, :ws], fb.valid[:hs, :ws]) and not fb.valid[hs:].any()
        torch.testing.assert_close(fa.images_lab[:, :hs, :ws], fb.images_lab[:, :hs, :ws])


class PooledFeatures(nn.Module):
    """Backbone stand-in: at each stride s, a fixed 1×1 projection of the s×s average pool of the
    image. Each feature cell depends only on the pixels it covers, so the features of an image's
    valid region are the same on any canvas (a CNN's are not: its receptive fields reach the
    padding and the canvas border, as in Deformable DETR and IDOL)."""

    def __init__(self, channels: dict[int, int]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.channels = channels
        self.weights = {s: torch.randn(c, 3, generator=g) for s, c in channels.items()}

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return {s: torch.einsum("ck,bkhw->bchw", w, F.avg_pool2d(images, s)) for s, w in self.weights.items()}


class StrideFourHead(nn.Module):
    """Mask-branch stand-in: a fixed 1×1 projection of the stride-4 feature (the real branch's
    GroupNorm statistics and 3×3 convs also see the padding)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = torch.randn(cout, cin, generator=torch.Generator().manual_seed(4))

    def forward(self, memory_maps: list[torch.Tensor], stride4: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ck,bkhw->bchw", self.weight, stride4)


def canvas_free_features(model: nn.Module) -> nn.Module:
    """The model with its canvas-dependent feature extractors replaced (backbone, GroupNorm of the
    input projections, mask branch): everything that handles coordinates — encoder reference
    points, deformable sampling, decoder references and boxes, relative coordinates of the dynamic
    mask head — stays the model's own."""
    cfg = model.cfg
    model.backbone = PooledFeatures(model.backbone.channels)
    for proj in model.input_proj:
        proj[1] = nn.Identity()
    model.mask_branch = StrideFourHead(model.backbone.channels[cfg.mask_stride], cfg.mask_channels)
    return model


def test_model_outputs_on_a_clip_do_not_depend_on_the_canvas():
    torch.manual_seed(0)
    model = canvas_free_features(build_model(ModelConfig.tiny(num_classes=2))).eval()
    alone, batched, (h, w) = _alone_and_batched()
    hs, ws = h // STRIDE, w // STRIDE
    with torch.no_grad():
        out_a = model(*alone.model_inputs("cpu"))
        out_b = model(*batched.model_inputs("cpu"))
        ia, ib = [0, 1], [2, 3]  # the small clip's images in each batch
        torch.testing.assert_close(out_b.boxes[:, ib], out_a.boxes[:, ia], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_b.logits[:, ib], out_a.logits[:, ia], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_b.embeddings[ib], out_a.embeddings[ia], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_b.image_sizes[ib], out_a.image_sizes[ia], rtol=0, atol=0)
        assert out_a.image_sizes[0].tolist() == [h, w]
        queries = torch.arange(model.cfg.num_queries)
        for lid in range(out_a.num_layers):
            for a, b in zip(ia, ib):
                ma = model.mask_logits(out_a, lid, a, queries)[:, :hs, :ws]
                mb = model.mask_logits(out_b, lid, b, queries)[:, :hs, :ws]
                torch.testing.assert_close(mb, ma, rtol=1e-4, atol=1e-4)


class FixedBoxes(nn.Module):
    """A model whose every query predicts the image-normalised box (0.5, 0.5, 0.5, 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model(ModelConfig.tiny(num_classes=2))
        self.cfg = self.model.cfg

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor):
        out = self.model(images, padding_mask)
        out.boxes = torch.full_like(out.boxes, 0.5)
        return out

    def mask_logits(self, *args):
        return self.model.mask_logits(*args)


def test_inference_boxes_are_relative_to_the_frame_not_the_padded_canvas():
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)  # padded to 64×64
    cfg = InferenceConfig(score_threshold=0.0, new_track_score=0.0, test_short_side=None)
    tracks = predict_video(FixedBoxes(), frames, cfg)
    boxes = [d.box for tr in tracks for d in tr.detections.values()]
    assert boxes
    for box in boxes:
        np.testing.assert_allclose(box, [56 / 4, 40 / 4, 3 * 56 / 4, 3 * 40 / 4], rtol=1e-6)
