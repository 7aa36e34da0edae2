"""Training as IDOL / the PM-VIS authors: contrastive sample selection on hand-made cost / IoU
matrices, BoxInst weights, freeze_at, scaled bottom_pixels_removed, random crop, antialiased resize,
the pseudo-mask loss ÷ quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_vis_model import clip, tiny_model  # noqa: F401  (clip is a fixture)

from pmvis.models.vis import normalize_images, resize_images, valid_masks
from pmvis.models.vis.config import LossConfig
from pmvis.models.vis.criterion import VISCriterion
from pmvis.models.vis.matcher import DynamicKMatcher, Match, dynamic_k_assign
from pmvis.models.vis.tracking_loss import contrastive_samples
from pmvis.platform.data.clips import resize_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _match(cost: torch.Tensor, iou: torch.Tensor, topk: int = 10) -> Match:
    q_idx, g_idx = dynamic_k_assign(cost, iou, topk)
    primary = torch.tensor([int(q_idx[g_idx == g][cost[q_idx[g_idx == g], g].argmin()]) for g in range(cost.shape[1])])
    return Match(q_idx, g_idx, cost, primary, iou)


def test_contrastive_negatives_keep_overlapping_queries_and_one_anchor_per_instance():
    q = 300
    # reference frame, two instances. Instance 0: queries 0–1 at IoU 0.9, queries 2–5 at 0.45.
    # Instance 1: queries 10–11 at IoU 0.8. Cost = −IoU (+ a tie-break by query index).
    iou = torch.zeros(q, 2)
    iou[0:2, 0], iou[2:6, 0], iou[10:12, 1] = 0.9, 0.45, 0.8
    cost = -iou + torch.arange(q, dtype=torch.float32)[:, None] * 1e-4
    ref = _match(cost, iou)
    # key frame: instance 0 matched by queries 20, 21 (21 cheaper), instance 1 by 30; a third instance
    # (id 7) only in the key frame gets no anchor
    key_iou = torch.zeros(q, 3)
    key_iou[20:22, 0], key_iou[30, 1], key_iou[40, 2] = 0.7, 0.9, 0.9
    key_cost = -key_iou + torch.arange(q, dtype=torch.float32)[:, None] * 1e-4
    key_cost[21, 0] -= 1.0
    key = _match(key_cost, key_iou)
    samples = contrastive_samples(key, ref, torch.tensor([5, 6, 7]), torch.tensor([5, 6]), neg_topk=100,
                                  aux_negatives_per_positive=10, generator=torch.Generator().manual_seed(0))
    # one anchor per instance present in both frames: the cheapest matched key query
    assert [s.anchor for s in samples] == [21, 30]
    s0 = samples[0]
    # positives: k = ⌊Σ top-10 IoUs⌋ = ⌊1.8 + 1.8⌋ = 3 cheapest → queries 0, 1, 2
    assert s0.positives.tolist() == [0, 1, 2]
    # negatives: all but the k = ⌊Σ top-100 IoUs⌋ = 3 queries the wide assignment gives instance 0;
    # so queries 3, 4, 5 (IoU 0.45 > 0.3) are hard negatives, and instance 1's queries too
    negatives = set(s0.negatives.tolist())
    assert len(negatives) == q - 3 and {3, 4, 5, 10, 11} <= negatives and not negatives & {0, 1, 2}
    assert int((iou[s0.negatives, 0] > 0.3).sum()) == 3
    # aux: at most 10 negatives per positive, drawn from the negatives
    assert len(s0.aux_negatives) == 30 and set(s0.aux_negatives.tolist()) <= negatives
    # the old rule (exclude the 100 cheapest queries by cost) kept no negative with IoU > 0.3
    old = set(range(q)) - set(cost[:, 0].argsort()[:100].tolist())
    assert not any(float(iou[n, 0]) > 0.3 for n in old)


def test_matcher_centre_region_is_a_fixed_radius_as_idol():
    m = DynamicKMatcher.from_config(LossConfig())
    gt = torch.tensor([[0.5, 0.5, 0.6, 0.6]])  # a large box: ±0.3
    # query centres inside the box, at 0.05 and 0.2 from the GT centre: only the first is within
    # 2.5 / 32 = 0.078 (IDOL's get_in_boxes_info), so only it avoids the 100 centre cost
    boxes = torch.tensor([[0.55, 0.5, 0.6, 0.6], [0.7, 0.5, 0.6, 0.6]])
    cost, _ = m.cost(torch.zeros(2, 1), boxes, torch.tensor([0]), gt)
    assert float(cost[1, 0] - cost[0, 0]) > 90


def test_boxinst_weights_reach_the_loss(clip):  # noqa: F811
    images, _, targets = clip
    assert (LossConfig().projection_weight, LossConfig().pairwise_weight) == (2.0, 2.0)  # PM-VIS authors
    model = tiny_model()
    with torch.no_grad():
        out = model(normalize_images(images))
        it = 20000  # past the pairwise warm-up
        base = VISCriterion(LossConfig(projection_weight=0.0, pairwise_weight=0.0))(out, targets, model.mask_logits,
                                                                                   iteration=it)
        on = VISCriterion(LossConfig())(out, targets, model.mask_logits, iteration=it)
    terms = sum(on[k] for k in on if k.startswith(("proj", "pairwise")))
    assert (on["loss"] - base["loss"]).item() == pytest.approx(2.0 * terms.item(), rel=1e-4)


def test_bottom_pixels_scaled_per_image():
    pad = torch.zeros(2, 64, 32, dtype=torch.bool)
    valid = valid_masks(pad, 4, torch.tensor([8, 20]))
    # rows sampled at 2, 6, …, 62: 8 rows removed leave rows < 56 (14 cells), 20 leave < 44 (11 cells)
    assert valid[0].any(1).sum() == 14 and valid[1].any(1).sum() == 11


def test_training_and_inference_resize_alike():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    small = resize_frame(frame, (60, 80))
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    ref = resize_images(x, (60, 80))[0].round().permute(1, 2, 0).numpy()
    assert np.array_equal(small, ref)
    aliased = resize_frame(frame, (60, 80), antialias=False)
    # antialiasing averages the 2×2 neighbourhood: the result is smoother than plain bilinear
    assert small.astype(float).std() < aliased.astype(float).std()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from pmvis.platform.data.synthetic import generate_synthetic
    from pmvis.platform.data.synthetic_scenes import SynthConfig

    d = tmp_path_factory.mktemp("synth")
    generate_synthetic(d, SynthConfig(videos=4, frames=3, seed=0), overwrite=True)
    return d


def test_freeze_at_freezes_stem_and_first_stage(synth_dir):
    from pmvis.platform.train.config import TrainConfig
    from pmvis.platform.train.loop import TrainingLoop

    loop = TrainingLoop(TrainConfig.tiny(synth_dir, freeze_at=2, iterations=2))
    body = loop.core.backbone.body
    assert loop.core.backbone.frozen == ["stem", "s1"]  # RegNet's stem and first stage
    assert not any(p.requires_grad for p in body.s1.parameters())
    assert all(p.requires_grad for p in body.s2.parameters())
    frozen_ids = {id(p) for p in body.stem.parameters()}
    assert not any(id(p) in frozen_ids for g in loop.optimizer.param_groups for p in g["params"])
    before = {k: v.clone() for k, v in body.s1.state_dict().items()}
    loop.step(0)
    assert not body.s1.training  # BatchNorm statistics stay as loaded
    for k, v in body.s1.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_random_crop_boxes_follow_the_crop(synth_dir):
    from pmvis.platform.data.clips import build_sampler
    from pmvis.platform.data.vis_data import DataConfig, load_training_data

    cfg = DataConfig(data_dir=str(synth_dir), short_side=None, max_size=None, crop=(40, 48), crop_prob=1.0,
                     flip_prob=0.0, val_fraction=0.0)
    data = load_training_data(cfg, num_classes=5, need_gt_masks=True, need_pseudo=False, load_eval=False)
    sampler = build_sampler(data, cfg, batch_size=2, stride=4, need_gt_masks=True)
    batch = sampler.batch(3)
    sizes = (~batch.padding_mask).any(1).sum(1).tolist(), (~batch.padding_mask).any(2).sum(1).tolist()
    assert all(40 <= s <= 48 for s in sizes[0] + sizes[1])  # every frame is its own crop
    for clip_labels in batch.labels:
        for f in clip_labels:
            assert bool(((f.boxes[:, :2] >= 0) & (f.boxes[:, :2] <= 1)).all())  # centres inside the crop
            if f.gt_masks is not None and len(f.labels):  # the mask cropped with the frame
                assert float(f.gt_masks.sum()) > 0


def test_pseudo_loss_divided_by_quality(synth_dir):
    from pmvis.core.masks import box_mask_rle
    from pmvis.platform.data.clips import ClipSampler
    from pmvis.platform.data.ytvis import Annotation

    ann = Annotation(id=1, video_id=1, category_id=1, segmentations=[box_mask_rle([0, 0, 4, 4], 8, 8)] * 2,
                     bboxes=[[0, 0, 4, 4]] * 2, areas=[16.0] * 2, extra={"quality": 0.5, "frame_quality": [0.8, None]})
    sampler = ClipSampler.__new__(ClipSampler)
    sampler.pseudo_quality_weighting, sampler.pseudo_divide_by_quality, sampler.pseudo_quality_floor = False, True, 0.05
    assert sampler.pseudo_weight(ann, 0) == pytest.approx(1 / 0.8)  # the frame's quality
    assert sampler.pseudo_weight(ann, 1) == pytest.approx(1 / 0.5)  # the track's, where the frame has none
    ann.extra = {"quality": 0.0}
    assert sampler.pseudo_weight(ann, 0) == pytest.approx(1 / 0.05)  # floored, never ÷ 0
    ann.extra = {}
    assert sampler.pseudo_weight(ann, 0) == 1.0  # no quality recorded: neither up- nor down-weighted
    with pytest.raises(ValueError, match="exclude each other"):
        LossConfig(pseudo_quality_weighting=True, pseudo_divide_by_quality=True)


def test_init_from_another_class_count_keeps_all_but_the_class_heads(synth_dir, tmp_path):
    from pmvis.models.vis import build_model
    from pmvis.models.vis.checkpoint import read_checkpoint, save_checkpoint
    from pmvis.models.vis.config import ModelConfig
    from pmvis.platform.train.config import TrainConfig
    from pmvis.platform.train.loop import TrainingLoop

    torch.manual_seed(1)
    coco_cfg = ModelConfig.tiny(num_classes=80)  # a COCO pretraining
    coco = build_model(coco_cfg)
    path = save_checkpoint(tmp_path / "coco.pt", coco, coco_cfg)
    loop = TrainingLoop(TrainConfig.tiny(synth_dir, iterations=2))  # 5 synthetic classes
    fresh = loop.core.transformer.class_heads[0].weight.detach().clone()
    loop.init_weights(read_checkpoint(path))
    box_layer = coco.transformer.box_heads[1].layers[0].weight
    assert torch.equal(loop.core.transformer.box_heads[1].layers[0].weight, box_layer)
    assert torch.equal(loop.core.transformer.class_heads[0].weight, fresh)  # 5 rows, freshly initialised
    other = ModelConfig.tiny(num_classes=80, hidden_dim=64)
    save_checkpoint(tmp_path / "other.pt", build_model(other), other)
    from pmvis.core.errors import PmvisError

    with pytest.raises(PmvisError, match="hidden_dim"):
        loop.init_weights(read_checkpoint(tmp_path / "other.pt"))


@pytest.mark.parametrize("preset", ["ytvis19", "ytvis21", "ovis", "coco", "coco_ytvis19", "coco_ytvis21", "coco_ovis"])
def test_paper_presets_build_and_hold_idols_schedules(preset):
    from pmvis.platform.train.config import train_config_from

    cfg = train_config_from(None, ["data.data_dir=/data", "data.pseudo_annotations=fused.json"]
                            if not preset.startswith("coco") else ["data.data_dir=/data"], preset)
    assert cfg.model.mask_head == "idol" and cfg.freeze_at == 2
    assert cfg.batch_size * cfg.num_workers == {"ovis": 16}.get(preset, 32)  # VNext IMS_PER_BATCH
    if preset.startswith("coco"):
        assert (cfg.iterations, cfg.lr, cfg.lr_steps, cfg.data.format) == (59200, 2e-4, [22200, 44400], "coco")
        if preset != "coco":
            assert cfg.model.num_classes == len(cfg.data.target_categories)
            assert set(cfg.data.category_map.values()) <= set(cfg.data.target_categories)
    else:
        assert (cfg.iterations, cfg.lr_steps, cfg.loss.mode) == (12000, [8000], "pmvis")
        assert cfg.model.num_classes == (25 if preset == "ovis" else 40)


def test_category_map_remaps_and_drops(synth_dir):
    from pmvis.core.errors import PmvisError
    from pmvis.platform.data.vis_data import remap_categories
    from pmvis.platform.data.ytvis_io import load_dataset_dir

    ds = load_dataset_dir(synth_dir)
    first = sorted(ds.categories)[0]
    out = remap_categories(ds, {first: 7}, [5, 6, 7])
    assert sorted(out.categories) == [5, 6, 7] and out.categories[7] == ds.categories[first]
    assert {a.category_id for a in out.annotations} == {7}
    assert len(out.annotations) == sum(a.category_id == first for a in ds.annotations)
    with pytest.raises(PmvisError, match="does not have"):
        remap_categories(ds, {999: 1}, [1])
