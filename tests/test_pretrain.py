"""Pretraining input: COCO stills → pseudo videos (pmvis.platform.coco, pmvis.platform.pseudo_video)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pmvis.core.errors import PmvisError
from pmvis.core.masks import encode_mask
from pmvis.platform.data.clips import build_sampler
from pmvis.platform.data.coco import load_coco_stills
from pmvis.platform.data.vis_data import DataConfig, load_training_data

H, W = 96, 128
SQUARE = (40, 30, 36, 28)  # x, y, w, h of the white object


def _write_coco(root: Path, *, with_masks: bool, extra_annotations: list | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = (rng.random((H, W, 3)) * 60).astype(np.uint8)  # dark noise: the object is the only bright thing
    x, y, w, h = SQUARE
    image[y:y + h, x:x + w] = 255
    cv2.imwrite(str(root / "images" / "a.png"), image)
    ann = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
    if with_masks:
        m = np.zeros((H, W), np.uint8)
        m[y:y + h, x:x + w] = 1
        ann["segmentation"] = encode_mask(m)
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": W, "height": H}],
            "annotations": [ann] + (extra_annotations or []),
            "categories": [{"id": 3, "name": "square"}, {"id": 5, "name": "other"}]}
    path = root / "coco.json"
    path.write_text(json.dumps(coco))
    return path


def _sampler(root: Path, *, need_gt_masks: bool = False, frames: int = 3, **pv):
    cfg = DataConfig(data_dir=str(root), format="coco", annotations="coco.json", image_dir="images",
                     short_side=None, max_size=None, val_fraction=0.0, clip_frames=frames, flip_prob=0.5,
                     prefetch=False, pseudo_video=pv or {})
    data = load_training_data(cfg, num_classes=2, need_gt_masks=need_gt_masks)
    return build_sampler(data, cfg, batch_size=1, stride=4, need_gt_masks=need_gt_masks)


def _bright_box(image_chw) -> np.ndarray:
    """xyxy of the bright object's pixels in a (3, H, W) uint8 frame."""
    bright = image_chw.numpy().min(0) > 200
    ys, xs = np.nonzero(bright)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "boxes-only"])
def test_still_becomes_clip_with_consistent_boxes(tmp_path, with_masks):
    _write_coco(tmp_path, with_masks=with_masks)
    sampler = _sampler(tmp_path, need_gt_masks=with_masks, scale=[0.7, 1.4], translate=0.15)
    moved = 0
    for it in range(6):
        batch = sampler.batch(it)
        assert batch.num_frames == 3
        hh, ww = batch.image_size
        boxes_seen = []
        for t, f in enumerate(batch.labels[0]):
            if f.labels.numel() == 0:
                continue  # the object was pushed out of this view
            assert f.instance_ids.tolist() == [1] and f.labels.tolist() == [0]
            cx, cy, bw, bh = f.boxes[0].tolist()
            box = np.array([(cx - bw / 2) * ww, (cy - bh / 2) * hh, (cx + bw / 2) * ww, (cy + bh / 2) * hh])
            np.testing.assert_allclose(box, _bright_box(batch.images[t]), atol=2.0)
            if with_masks:
                assert f.gt_masks is not None and f.gt_masks.shape[0] == 1 and f.gt_masks.sum() > 0
            boxes_seen.append(box)
        moved += len(boxes_seen) >= 2 and not np.allclose(boxes_seen[0], boxes_seen[1], atol=1.0)
    assert moved, "the frames of a pseudo clip should be different views of the still"


def test_batches_are_deterministic(tmp_path):
    _write_coco(tmp_path, with_masks=False)
    a, b = _sampler(tmp_path).batch(5), _sampler(tmp_path).batch(5)
    assert np.array_equal(a.images.numpy(), b.images.numpy())


def test_boxes_only_coco_file_is_accepted(tmp_path):
    path = _write_coco(tmp_path, with_masks=False)
    ds = load_coco_stills(path, tmp_path / "images")
    assert list(ds.videos) == [7] and ds.videos[7].length == 1
    (ann,) = ds.annotations
    assert ann.segmentations == [None] and ann.bboxes[0] == [float(v) for v in SQUARE]


def test_full_mode_refuses_boxes_only_file(tmp_path):
    _write_coco(tmp_path, with_masks=False)
    with pytest.raises(PmvisError, match="needs mask annotations"):
        _sampler(tmp_path, need_gt_masks=True)


@pytest.mark.parametrize("bad, message", [
    ({"id": 2, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]}, r"annotation id=2 \(image id=99\): 'image_id' 99"),
    ({"id": 3, "image_id": 7, "category_id": 3, "bbox": [100, 10, 60, 5]}, r"annotation id=3 \(image id=7\): bbox .* outside the 128x96 image a.png"),
    ({"id": 4, "image_id": 7, "category_id": 9, "bbox": [1, 1, 5, 5]}, r"annotation id=4 \(image id=7\): 'category_id' 9"),
    ({"id": 5, "image_id": 7, "category_id": 3, "bbox": [1, 1, "x", 5]}, r"annotation id=5 \(image id=7\): 'bbox' must be"),
    ({"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 5]}, r"annotation id=1 \(image id=7\): duplicate"),
])
def test_malformed_coco_names_the_place(tmp_path, bad, message):
    path = _write_coco(tmp_path, with_masks=False, extra_annotations=[bad])
    with pytest.raises(PmvisError, match=message) as err:
        load_coco_stills(path, tmp_path / "images")
    assert str(path) in str(err.value)


def test_malformed_coco_json_and_structure(tmp_path):
    (tmp_path / "images").mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    with pytest.raises(PmvisError, match=r"broken.json: malformed JSON at line 1"):
        load_coco_stills(broken, tmp_path / "images")
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(PmvisError, match=r"no_images.json: (.|\n)*missing top-level key 'images'"):
        load_coco_stills(no_images, tmp_path / "images")
    escape = tmp_path / "escape.json"
    escape.write_text(json.dumps({"images": [{"id": 1, "file_name": "../x.png", "width": 4, "height": 4}],
                                  "annotations": [], "categories": []}))
    with pytest.raises(PmvisError, match=r"image id=1: file name '../x.png' contains '..'"):
        load_coco_stills(escape, tmp_path / "images")


def test_missing_image_is_named_when_read(tmp_path):
    _write_coco(tmp_path, with_masks=False)
    (tmp_path / "images" / "a.png").unlink()
    sampler = _sampler(tmp_path)
    with pytest.raises(PmvisError, match=r"video id=7, frame 0\b.*a.png.*missing"):
        sampler.batch(0)


def test_the_shipped_start_fits_the_tiny_preset_it_was_trained_with(tmp_path):
    """The packaged weights load into ``TrainConfig.tiny``'s model. A new ModelConfig knob changes
    the architecture fingerprint unless it is listed with its old value (checkpoint.LATER_KNOBS):
    without that, every older checkpoint and the demo's start would be refused."""
    from pmvis.models.vis.checkpoint import check_compatible, load_model, read_checkpoint
    from pmvis.models.weights import TINY_PRETRAINED, shipped_weights
    from pmvis.platform.train.config import TrainConfig

    path = shipped_weights(TINY_PRETRAINED)
    check_compatible(read_checkpoint(path), TrainConfig.tiny(tmp_path).model)
    model, cfg, _ = load_model(path)
    assert cfg == TrainConfig.tiny(tmp_path).model and sum(p.numel() for p in model.parameters()) > 0
