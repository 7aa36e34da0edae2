"""The VIS model (IDOL + CondInst mask head + tracking embedding) and its losses, on a tiny config."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from pmvis.core.errors import PmvisError
from pmvis.kernels import tk_affinity, tk_loss
from pmvis.models.vis import (
    IDOL,
    MODEL_BUILDERS,
    FrameTargets,
    LossConfig,
    ModelConfig,
    MSDeformAttn,
    VISCriterion,
    box_masks_from_boxes,
    build_model,
    dynamic_k_assign,
    lab_images,
    mask_targets,
    ms_deform_attn,
    ms_deform_attn_naive,
    normalize_images,
    valid_masks,
)
from pmvis.models.vis.boxes import xyxy_to_cxcywh
from pmvis.models.vis.matcher import DynamicKMatcher
from pmvis.models.vis.tracking_loss import tracking_losses

SIZE = 64
STRIDE = 4


# ------------------------------------------------------------------ a synthetic clip, built here


def draw_clip(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Two RGB frames (2, 3, size, size) in [0, 255] on a green background: a red 20×20 square
    (class 0, id 1) and a blue disc of radius 12 (class 1, id 2), both moving; masks (2, 2, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    frames, masks = [], []
    for (sx, sy), (dx, dy) in (((8, 10), (40, 36)), ((12, 12), (37, 33))):
        img = torch.empty(3, size, size)
        img[:] = torch.tensor([90.0, 150.0, 90.0])[:, None, None]
        square = (xx >= sx) & (xx < sx + 20) & (yy >= sy) & (yy < sy + 20)
        disc = (xx - dx) ** 2 + (yy - dy) ** 2 <= 12**2
        img[:, square] = torch.tensor([220.0, 40.0, 40.0])[:, None]
        img[:, disc] = torch.tensor([40.0, 60.0, 220.0])[:, None]
        frames.append(img)
        masks.append(torch.stack([square, disc]))
    return torch.stack(frames), torch.stack(masks)


def tight_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = mask.nonzero(as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def clip_targets(images: torch.Tensor, masks: torch.Tensor, *, bottom: int = 10) -> list[FrameTargets]:
    t_frames, _, h, w = images.shape
    lab = lab_images(images, STRIDE)
    valid = valid_masks(torch.zeros(t_frames, h, w, dtype=torch.bool), STRIDE, bottom)
    out = []
    for t in range(t_frames):
        boxes = xyxy_to_cxcywh(torch.stack([tight_box(m) for m in masks[t]]) / torch.tensor([w, h, w, h]))
        gm = mask_targets(masks[t], STRIDE)
        out.append(FrameTargets(
            labels=torch.tensor([0, 1]), boxes=boxes, instance_ids=torch.tensor([1, 2]),
            box_masks=box_masks_from_boxes(boxes, (h, w), STRIDE), images_lab=lab[t], valid=valid[t],
            gt_masks=gm, pseudo_masks=gm, pseudo_weights=torch.tensor([1.0, 0.5])))
    return out


@pytest.fixture(scope="module")
def clip():
    images, masks = draw_clip()
    return images, masks, [clip_targets(images, masks)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> IDOL:
    torch.manual_seed(seed)
    return build_model(ModelConfig.tiny(num_classes=2, **overrides))


_tiny_model = tiny_model


# ------------------------------------------------------------------ config


def test_config_defaults_are_the_papers_and_tiny_is_small():
    cfg = ModelConfig()
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_queries, cfg.enc_layers, cfg.dec_layers, cfg.num_heads,
            cfg.num_points, cfg.num_feature_levels, cfg.ffn_dim, cfg.mask_stride) == \
        ("resnet50", 256, 300, 6, 6, 8, 4, 4, 1024, 4)
    assert cfg.feature_strides == [8, 16, 32, 64]
    assert cfg.dynamic_dims == [10, 8, 8, 1] and cfg.num_mask_params == 169  # CondInst / IDOL
    loss = LossConfig()
    assert (loss.class_weight, loss.l1_weight, loss.giou_weight, loss.mask_focal_weight, loss.mask_dice_weight,
            loss.track_weight, loss.track_aux_weight) == (2, 5, 2, 2, 5, 2, 3)
    assert (loss.pairwise_size, loss.pairwise_dilation, loss.pairwise_threshold, loss.pairwise_warmup_iters) == \
        (3, 2, 0.3, 10000)
    tiny = ModelConfig.tiny(num_classes=3)
    assert tiny.hidden_dim == 32 and tiny.num_queries == 50 and tiny.num_classes == 3
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ModelConfig(hidden_dim=30, num_heads=4, norm_groups=2)
    with pytest.raises(ValueError):
        LossConfig(mode="masks")
    with pytest.raises(ValueError):
        ModelConfig(unknown_knob=1)


# ------------------------------------------------------------------ shapes


def test_forward_shapes_and_mask_logits_of_selected_queries():
    model = tiny_model()
    cfg = model.cfg
    images = torch.randint(0, 256, (3, 3, 64, 96), dtype=torch.uint8)
    x = normalize_images(images)
    assert torch.allclose(x, normalize_images(images.float()))
    padding = torch.zeros(3, 64, 96, dtype=torch.bool)
    padding[1, :, 80:] = True
    out = model(x, padding)
    L, B, Q = cfg.dec_layers, 3, cfg.num_queries
    assert out.logits.shape == (L, B, Q, 2)
    assert out.boxes.shape == (L, B, Q, 4) and ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.mask_params.shape == (L, B, Q, cfg.num_mask_params)
    assert out.mask_features.shape == (B, cfg.mask_channels, 16, 24)
    assert out.embeddings.shape == (B, Q, cfg.embed_dim)
    assert out.hidden.shape == (L, B, Q, cfg.hidden_dim)
    assert out.image_size == (64, 96) and out.mask_size == (16, 24)
    some = model.mask_logits(out, 1, 2, torch.tensor([0, 7, 3]))
    assert some.shape == (3, 16, 24)
    # evaluated per selected query: the same logits one by one, or with per-query image indices
    single = model.mask_logits(out, 1, 2, torch.tensor([7]))
    torch.testing.assert_close(some[1:2], single)
    mixed = model.mask_logits(out, 0, torch.tensor([0, 2]), torch.tensor([5, 5]))
    torch.testing.assert_close(mixed[1], model.mask_logits(out, 0, 2, torch.tensor([5]))[0])
    assert MODEL_BUILDERS["idol"] is build_model
    with pytest.raises(ValueError, match="multiple of the mask stride"):
        model(torch.zeros(1, 3, 62, 64))


def test_dynamic_convs_by_hand():
    """The dynamic head of one query equals 1×1 convs written out with its parameters."""
    model = tiny_model()
    out = model(normalize_images(torch.randint(0, 256, (1, 3, 64, 64))))
    q = 4
    logits = model.mask_logits(out, 0, 0, torch.tensor([q]))[0]
    dims = model.cfg.dynamic_dims
    params = out.mask_params[0, 0, q]
    h, w = out.mask_size
    xs = (torch.arange(w) * 4 + 2) / 64
    ys = (torch.arange(h) * 4 + 2) / 64
    cx, cy = out.boxes[0, 0, q, :2]
    rel = torch.stack((cx - xs[None, :].expand(h, w), cy - ys[:, None].expand(h, w)))
    x = torch.cat((out.mask_features[0], rel)).flatten(1)
    torch.testing.assert_close(logits, _dynamic_convs_by_hand(params, dims, x).view(h, w))


def _dynamic_convs_by_hand(params: torch.Tensor, dims: list[int], x: torch.Tensor) -> torch.Tensor:
    """1×1 convs written out from one query's flat parameters (weights first, then biases)."""
    n_w = [i * o for i, o in zip(dims[:-1], dims[1:])]
    ws = params[:sum(n_w)].split(n_w)
    bs = params[sum(n_w):].split(dims[1:])
    for k, (wk, bk) in enumerate(zip(ws, bs)):
        x = wk.view(dims[k + 1], dims[k]) @ x + bk[:, None]
        if k < len(ws) - 1:
            x = x.relu()
    return x


# ------------------------------------------------------------------ deformable attention


def test_grid_sample_deformable_attention_equals_naive_bilinear():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 7), (3, 4), (2, 1)]
    b, lq, m, d, p = 2, 5, 3, 4, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    # locations partly outside [0, 1]: zero padding must agree too
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    fast = ms_deform_attn(value, shapes, loc, weights)
    ref = ms_deform_attn_naive(value, shapes, loc, weights)
    assert fast.shape == (b, lq, m * d)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    # a location exactly on a pixel centre returns that pixel
    loc = torch.full((1, 1, 1, 1, 1, 2), 0.0, dtype=torch.float64)
    loc[..., 0], loc[..., 1] = (2 + 0.5) / 7, (1 + 0.5) / 6
    one = ms_deform_attn(value[:1, :42, :1], shapes[:1], loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(one[0, 0], value[0, 1 * 7 + 2, 0])


def test_deformable_attention_module_with_points_and_boxes():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, levels=2, heads=2, points=2)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(2, 20, 16)
    query = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, :8] = True
    for ref in (torch.rand(2, 5, 2, 2), torch.rand(2, 5, 2, 4)):
        out = attn(query, ref, value, shapes, pad)
        assert out.shape == (2, 5, 16) and torch.isfinite(out).all()


# ------------------------------------------------------------------ matcher


def _matcher(**kw) -> DynamicKMatcher:
    return DynamicKMatcher.from_config(LossConfig(**kw))


def test_matcher_gives_the_gt_to_the_query_exactly_on_it():
    gt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    boxes = torch.tensor([[0.1, 0.9, 0.05, 0.05], [0.7, 0.7, 0.2, 0.2], [0.9, 0.1, 0.05, 0.05],
                          [0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.02, 0.02]])
    logits = torch.zeros(5, 3)
    m = _matcher()(logits, boxes, torch.tensor([2, 0]), gt)
    # each GT has one query with IoU 1 and the others ~0: dynamic k = 1
    assert m.query_idx.tolist() == [1, 3] and m.gt_idx.tolist() == [1, 0]
    assert m.primary.tolist() == [3, 1]
    empty = _matcher()(logits, boxes, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    assert empty.query_idx.numel() == 0 and empty.cost.shape == (5, 0)


def test_matcher_dynamic_k_is_the_floor_of_the_top_iou_sum():
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    # IoUs with the GT: 1, 0.81, 0.64, ~0 → Σ = 2.45 → k = 2; widths shrink about the same centre
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.36, 0.36], [0.5, 0.5, 0.32, 0.32],
                          [0.1, 0.1, 0.05, 0.05]])
    m = _matcher()(torch.zeros(4, 1), boxes, torch.tensor([0]), gt)
    assert m.query_idx.tolist() == [0, 1]
    # the same assignment by hand from a cost / IoU matrix
    cost = torch.tensor([[3.0], [1.0], [2.0], [0.5]])
    iou = torch.tensor([[0.9], [0.8], [0.7], [0.0]])  # Σ top = 2.4 → k = 2 cheapest
    q, g = dynamic_k_assign(cost, iou, topk=10)
    assert q.tolist() == [1, 3] and g.tolist() == [0, 0]
    q, _ = dynamic_k_assign(cost, iou, topk=1)  # Σ top-1 = 0.9 → clamped to k = 1
    assert q.tolist() == [3]


def test_matcher_never_matches_a_query_twice_and_covers_every_gt():
    # two GTs both want the same cheapest queries; conflicts go to the cheaper GT, the other GT
    # then takes its cheapest free query
    cost = torch.tensor([[0.0, 0.1], [1.0, 0.5], [2.0, 3.0], [5.0, 4.0]])
    iou = torch.tensor([[0.9, 0.9], [0.6, 0.6], [0.1, 0.1], [0.0, 0.0]])  # k = 1 each
    q, g = dynamic_k_assign(cost, iou, topk=10)
    assert sorted(zip(q.tolist(), g.tolist())) == [(0, 0), (1, 1)]
    torch.manual_seed(0)
    for _ in range(20):
        n, nq = 5, 12
        cost = torch.rand(nq, n)
        iou = torch.rand(nq, n)
        q, g = dynamic_k_assign(cost, iou, topk=10)
        assert q.unique().numel() == q.numel()
        assert set(g.tolist()) == set(range(n))


# ------------------------------------------------------------------ criterion


def _all_keys(mode: str, tk: bool, layers: int) -> set[str]:
    names = {"boxinst": ["proj", "pairwise"], "pmvis": ["proj", "pairwise", "pseudo_focal", "pseudo_dice"],
             "full": ["mask_focal", "mask_dice"]}[mode] + ["class", "l1", "giou"] + (["tk"] if tk else [])
    keys = {n for n in names} | {f"{n}_{i}" for n in names for i in range(layers - 1)}
    return keys | {"track", "track_aux", "loss"}


@pytest.mark.parametrize("mode", ["boxinst", "pmvis", "full"])
@pytest.mark.parametrize("tk", [False, True])
def test_criterion_every_mode_gives_finite_losses_and_gradients(clip, mode, tk):
    images, _, targets = clip
    model = tiny_model()
    crit = VISCriterion(LossConfig(mode=mode, tk=tk, loss_frames="all", pseudo_quality_weighting=True))
    out = model(normalize_images(images))
    losses = crit(out, targets, model.mask_logits, iteration=500)
    assert set(losses) == _all_keys(mode, tk, model.cfg.dec_layers)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss"] > 0
    if tk:
        assert losses["tk"] > 0
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_criterion_total_is_the_weighted_sum_with_warmups(clip):
    images, _, targets = clip
    model = tiny_model()
    cfg = LossConfig(mode="pmvis", tk=True, pairwise_warmup_iters=100, tk_warmup_calls=400)
    crit = VISCriterion(cfg)
    with torch.no_grad():
        out = model(normalize_images(images))
        losses = crit(out, targets, model.mask_logits, iteration=50)
    layers = out.num_layers
    expected = 0.0
    for name, value in losses.items():
        if name == "loss":
            continue
        base, _, suffix = name.rpartition("_") if name.rpartition("_")[2].isdigit() else (name, "", "")
        lid = int(suffix) if suffix else layers - 1
        expected += crit.weight(base, 50, layer=lid, num_layers=layers) * value.item()
    assert crit.weight("pairwise", 50) == pytest.approx(0.5 * cfg.pairwise_weight)
    # TK warm-up in loss calls: iteration 50 of 2 layers = calls 101 (last layer) and 102 (layer 0)
    assert crit.weight("tk", 50, layer=1, num_layers=2) == pytest.approx(101 / 400 * cfg.tk_weight)
    assert crit.weight("tk", 50, layer=0, num_layers=2) == pytest.approx(102 / 400 * cfg.tk_weight)
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_tk_warmup_counts_loss_calls_as_maskfreevis(clip):
    """MaskFreeVIS warms the TK term up over 2,000 calls of its mask loss, one call per decoder
    layer and iteration (last layer first): call c = i·L + 1 for the last layer of iteration i,
    i·L + l + 2 for layer l < L − 1; factor min(c / 2000, 1)."""
    images, _, targets = clip
    model = tiny_model()
    layers = model.cfg.dec_layers
    assert layers == 2
    with torch.no_grad():
        out = model(normalize_images(images))
        for iteration in (10, 999, 1000):
            on = VISCriterion(LossConfig(mode="boxinst", tk=True))(out, targets, model.mask_logits,
                                                                    iteration=iteration)
            off = VISCriterion(LossConfig(mode="boxinst", tk=True, tk_weight=0.0))(out, targets, model.mask_logits,
                                                                                    iteration=iteration)
            calls = [iteration * layers + (1 if lid == layers - 1 else lid + 2) for lid in range(layers)]
            expected = sum(0.5 * min(c / 2000, 1.0) * on["tk" if lid == layers - 1 else f"tk_{lid}"].item()
                           for lid, c in enumerate(calls))
            # float32 totals: the difference of two losses carries their rounding (~1e-7 of the total)
            tol = 1e-6 * max(1.0, on["loss"].item())
            assert (on["loss"] - off["loss"]).item() == pytest.approx(expected, rel=1e-4, abs=tol), iteration
    crit = VISCriterion(LossConfig(tk=True))
    assert crit.cfg.tk_warmup_calls == 2000
    # IDOL's 6 decoder layers: iteration 0 makes calls 1 (last layer), 2..6 (layers 0..4)
    assert [crit.tk_warmup_call(0, lid, 6) for lid in range(6)] == [2, 3, 4, 5, 6, 1]
    assert crit.tk_warmup_call(333, 5, 6) == 333 * 6 + 1
    assert crit.weight("tk", 333, layer=5, num_layers=6) == pytest.approx(0.5 * (333 * 6 + 1) / 2000)
    assert crit.weight("tk", 334, layer=0, num_layers=6) == 0.5  # call 2006: warmed up after ~334 iterations
    with pytest.raises(ValueError, match="num_layers"):
        crit.weight("tk", 10)
    with pytest.raises(ValueError, match="tk_warmup_calls"):
        LossConfig(tk_warmup_iters=2000)


def test_criterion_handles_absent_instances_and_key_frame_only(clip):
    images, masks, _ = clip
    targets = clip_targets(images, masks)
    # the disc is absent from frame 1
    f = targets[1]
    targets[1] = FrameTargets(labels=f.labels[:1], boxes=f.boxes[:1], instance_ids=f.instance_ids[:1],
                              box_masks=f.box_masks[:1], images_lab=f.images_lab, valid=f.valid)
    model = tiny_model()
    crit = VISCriterion(LossConfig(mode="boxinst", tk=True))  # loss_frames="key" (IDOL's default)
    losses = crit(model(normalize_images(images)), [targets], model.mask_logits, iteration=10)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    # a key frame with no instance at all: zero mask / box / tracking terms, still differentiable
    f = targets[0]
    targets[0] = FrameTargets(labels=f.labels[:0], boxes=f.boxes[:0], instance_ids=f.instance_ids[:0],
                              box_masks=f.box_masks[:0], images_lab=f.images_lab, valid=f.valid)
    losses = crit(model(normalize_images(images)), [targets], model.mask_logits, iteration=10)
    assert losses["proj"] == 0 and losses["track"] == 0 and losses["class"] > 0
    losses["loss"].backward()
    with pytest.raises(ValueError, match="gt_masks"):
        VISCriterion(LossConfig(mode="full", loss_frames="all"))(
            model(normalize_images(images)), [targets], model.mask_logits)


def three_frame_clip() -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_clip`'s two frames + frame 0 shifted by (3, 2) px as frame 2: (3, 3, S, S), masks."""
    images, masks = draw_clip()
    return (torch.cat([images, images[:1].roll((3, 2), dims=(-2, -1))]),
            torch.cat([masks, masks[:1].roll((3, 2), dims=(-2, -1))]))


def _tk_by_hand(model: IDOL, crit: VISCriterion, out, images: torch.Tensor, targets: list[FrameTargets],
                lid: int) -> torch.Tensor:
    """TK-Loss of one clip at layer ``lid``: per pair (a, b), only the instances present and matched
    in both frames, each frame's logits from that frame's own primary query, U = the union of the
    instance's box masks over the whole clip, the pair's matches from the 2-frame clip (a, b)."""
    lab = torch.stack([f.images_lab for f in targets])
    primary = []
    for t, f in enumerate(targets):
        m = crit.matcher(out.logits[lid, t], out.boxes[lid, t], f.labels, f.boxes)
        primary.append({int(u): int(m.primary[g]) for g, u in enumerate(f.instance_ids.tolist())})
    uids = sorted(set().union(*primary))
    union = {u: torch.stack([f.box_masks[f.instance_ids.tolist().index(u)] for f in targets
                             if u in f.instance_ids.tolist()]).amax(0) for u in uids}
    total = torch.zeros(())
    for a, b in tk_affinity(lab).pairs:
        both = [u for u in uids if primary[a].get(u, -1) >= 0 and primary[b].get(u, -1) >= 0]
        if not both:
            continue
        logits = torch.stack([model.mask_logits(out, lid, a, torch.tensor([primary[a][u] for u in both])),
                              model.mask_logits(out, lid, b, torch.tensor([primary[b][u] for u in both]))], 1)
        u_masks = torch.stack([union[u] for u in both])[:, None].expand(-1, 2, -1, -1)
        total = total + tk_loss(logits, u_masks, tk_affinity(lab[[a, b]], pairs=[(0, 1)]))
    return total


def test_tk_pairs_only_instances_present_and_matched_in_both_frames():
    """IDOL's queries are per frame: an instance absent from a frame has no prediction there, so it
    takes part only in the pairs of frames where it is present (and matched) in both."""
    images, masks = three_frame_clip()
    targets = clip_targets(images, masks)
    f = targets[1]  # the disc (id 2) is absent from frame 1: it counts in pair (0, 2) only
    targets[1] = FrameTargets(labels=f.labels[:1], boxes=f.boxes[:1], instance_ids=f.instance_ids[:1],
                              box_masks=f.box_masks[:1], images_lab=f.images_lab, valid=f.valid)
    model = tiny_model().eval()
    crit = VISCriterion(LossConfig(mode="boxinst", tk=True))
    with torch.no_grad():
        out = model(normalize_images(images))
        losses = crit(out, [targets], model.mask_logits, iteration=0)
        for lid in range(out.num_layers):
            name = "tk" if lid == out.num_layers - 1 else f"tk_{lid}"
            torch.testing.assert_close(losses[name], _tk_by_hand(model, crit, out, images, targets, lid),
                                       rtol=1e-5, atol=1e-7)


def test_tk_with_every_instance_everywhere_is_the_clip_loss():
    """Every instance present and matched in every frame: the per-pair sum is the TK-Loss of the
    whole clip's (N, T) logits (:func:`tk_loss` over all pairs at once)."""
    images, masks = three_frame_clip()
    targets = clip_targets(images, masks)
    model = tiny_model().eval()
    crit = VISCriterion(LossConfig(mode="boxinst", tk=True))
    with torch.no_grad():
        out = model(normalize_images(images))
        losses = crit(out, [targets], model.mask_logits, iteration=0)
        lid = out.num_layers - 1
        queries = [crit.matcher(out.logits[lid, t], out.boxes[lid, t], f.labels, f.boxes).primary
                   for t, f in enumerate(targets)]
        assert all((q >= 0).all() for q in queries)
        logits = torch.stack([model.mask_logits(out, lid, t, q) for t, q in enumerate(queries)], 1)
        boxes = torch.stack([f.box_masks for f in targets], 1)
        whole = tk_loss(logits, boxes, tk_affinity(torch.stack([f.images_lab for f in targets])))
    assert whole > 0
    torch.testing.assert_close(losses["tk"], whole, rtol=1e-6, atol=1e-8)


def test_gradients_reach_every_part_of_the_model(clip):
    images, _, targets = clip
    model = tiny_model()
    crit = VISCriterion(LossConfig(mode="pmvis", tk=True, loss_frames="all"))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    # two steps: the zero-initialised sampling-offset / attention-weight layers (Deformable DETR's
    # init) pass no gradient to their queries — the level embeddings — until they have been updated
    for _ in range(2):
        opt.zero_grad()
        crit(model(normalize_images(images)), targets, model.mask_logits, iteration=10**5)["loss"].backward()
        opt.step()
    parts = {
        "backbone": model.backbone, "input_proj": model.input_proj, "encoder": model.transformer.encoder,
        "decoder": model.transformer.decoder, "class_heads": model.transformer.class_heads,
        "box_heads": model.transformer.box_heads, "query_embed": model.transformer.query_embed,
        "mask_branch": model.mask_branch, "controller": model.controller, "embed_head": model.embed_head,
    }
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert model.transformer.level_embed.grad.abs().sum() > 0
    assert next(model.backbone.body.parameters()).grad.abs().sum() > 0  # the stem's first conv


def test_tracking_loss_by_hand():
    k = torch.tensor([[1.0, 0.0]])
    pos = [torch.tensor([[2.0, 0.0]])]
    neg = [torch.tensor([[0.0, 1.0], [-1.0, 0.0]])]
    contrast, aux = tracking_losses(k, pos, neg)
    assert contrast.item() == pytest.approx(math.log(1 + math.exp(0 - 2) + math.exp(-1 - 2)))
    # cosines 1 (target 1), 0 and −1 (target 0)
    assert aux.item() == pytest.approx((0 + 0 + 1) / 3)


# ------------------------------------------------------------------ backbone weights


def test_backbone_weights_round_trip_and_bad_files(tmp_path):
    tiny_model = functools.partial(_tiny_model, backbone="resnet18")  # the keys below are ResNet's
    source = tiny_model(seed=1)
    path = tmp_path / "r18.pt"
    torch.save(source.backbone.body.state_dict(), path)
    loaded = tiny_model(seed=2, backbone_weights=str(path))
    for (name, a), (_, b) in zip(source.backbone.body.state_dict().items(), loaded.backbone.body.state_dict().items()):
        assert torch.equal(a, b), name
    # a nested {"state_dict": ...} checkpoint with extra (classifier) keys also loads
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {**source.backbone.body.state_dict(), "fc.weight": torch.zeros(3, 3)}}, nested)
    tiny_model(backbone_weights=str(nested))

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(PmvisError, match="corrupt.pt"):
        tiny_model(backbone_weights=str(corrupt))
    wrong = dict(source.backbone.body.state_dict())
    wrong["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    del wrong["layer2.0.conv1.weight"]
    mismatched = tmp_path / "mismatched.pt"
    torch.save(wrong, mismatched)
    with pytest.raises(PmvisError, match="mis-shaped") as e:
        tiny_model(backbone_weights=str(mismatched))
    assert "missing" in str(e.value)
    with pytest.raises(PmvisError, match="not found"):
        tiny_model(backbone_weights=str(tmp_path / "absent.pt"))
    with pytest.raises(PmvisError, match="backbone"):
        build_model(ModelConfig.tiny(backbone="no_such_net"))


# ------------------------------------------------------------------ target helpers


def test_target_helpers():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.25]])  # x 16..48, y 24..40 of a 64×64 image
    bm = box_masks_from_boxes(boxes, (64, 64), 4)
    assert bm.shape == (1, 16, 16)
    assert bm[0].nonzero()[:, 1].unique().tolist() == list(range(4, 12))
    assert bm[0].nonzero()[:, 0].unique().tolist() == list(range(6, 10))
    pad = torch.zeros(1, 64, 64, dtype=torch.bool)
    pad[:, 48:] = True  # image height 48; its bottom 10 rows (38..47) are ignored too
    valid = valid_masks(pad, 4, 10)
    assert valid[0, :, 0].tolist() == [True] * 9 + [False] * 7  # sampled rows 2, 6, …, 34 valid


def test_area_mask_targets_are_the_covered_share_of_the_window_around_the_sampled_pixel():
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, 4:12, 6:10] = True
    point, area = mask_targets(m, 4), mask_targets(m, 4, "area")
    assert point.shape == area.shape == (1, 4, 4)
    # cell (1, 1) is centred on pixel (6, 6): its window spans pixels 4..8 (the edge ones count half)
    # — every row inside the mask, columns 6, 7 and half of 8: 2.5 of 4
    assert float(area[0, 1, 1]) == pytest.approx(0.625)
    assert float(point[0, 1, 2]) == 0.0 and float(area[0, 1, 2]) == pytest.approx(0.375)  # boundary inside the cell
    full = torch.ones(1, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(mask_targets(full, 4, "area")[0, :3, :3], torch.ones(3, 3))  # inside: 1
    # the last window reaches half a pixel past the canvas, which counts as background: (3.5 / 4)²
    assert float(mask_targets(full, 4, "area")[0, 3, 3]) == pytest.approx((3.5 / 4) ** 2)
    assert mask_targets(m, 2, "area").shape == (1, 8, 8)
    with pytest.raises(ValueError, match="'point' or 'area'"):
        mask_targets(m, 4, "nearest")


# ------------------------------------------------------------------ overfit smoke checks


def _train(clip, mode: str, steps: int, lr: float, warmup: int = 0) -> tuple[IDOL, VISCriterion]:
    images, _, targets = clip
    model = tiny_model(dropout=0.0)
    crit = VISCriterion(LossConfig(mode=mode, loss_frames="all", pairwise_warmup_iters=warmup))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = normalize_images(images)
    for step in range(steps):
        losses = crit(model(x), targets, model.mask_logits, iteration=step)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model, crit


@torch.no_grad()
def _matched_ious(model: IDOL, crit: VISCriterion, clip, *, full_resolution: bool) -> torch.Tensor:
    """(frames, instances) IoU of each GT's primary matched query's mask (last layer)."""
    images, masks, targets = clip
    model.eval()
    out = model(normalize_images(images))
    rows = []
    for t, f in enumerate(targets[0]):
        m = crit.matcher(out.logits[-1, t], out.boxes[-1, t], f.labels, f.boxes)
        logits = model.mask_logits(out, out.num_layers - 1, t, m.primary)
        if full_resolution:
            pred = F.interpolate(logits[None], size=images.shape[-2:], mode="bilinear", align_corners=False)[0] > 0
            gt = masks[t]
        else:
            pred, gt = logits > 0, f.gt_masks > 0.5
        rows.append((pred & gt).sum((1, 2)) / (pred | gt).sum((1, 2)))
    return torch.stack(rows)


def test_overfit_one_clip_with_full_masks(clip):
    model, crit = _train(clip, "full", steps=40, lr=1e-3)
    ious = _matched_ious(model, crit, clip, full_resolution=False)
    print("full-mask overfit IoU (frames × [square, disc]):", ious.tolist())
    assert (ious > 0.8).all(), ious


def test_overfit_one_clip_box_supervised_beats_the_filled_box(clip):
    images, masks, _ = clip
    # the pairwise warm-up matters: at full weight from step 0 it can freeze the inside of a box at
    # "all background" while the projection term is met by stray lines just outside the box
    model, crit = _train(clip, "boxinst", steps=180, lr=1e-3, warmup=60)
    ious = _matched_ious(model, crit, clip, full_resolution=True)
    box_ious = []
    for t in range(2):
        x0, y0, x1, y1 = tight_box(masks[t, 1]).long().tolist()
        box = torch.zeros_like(masks[t, 1])
        box[y0:y1, x0:x1] = True
        box_ious.append(((box & masks[t, 1]).sum() / (box | masks[t, 1]).sum()).item())
    print("boxinst overfit IoU (frames × [square, disc]):", ious.tolist(), "filled-box disc IoU:", box_ious)
    assert (ious[:, 1] > torch.tensor(box_ious) + 0.05).all(), (ious, box_ious)
    assert (ious[:, 0] > 0.6).all(), ious  # the square (its filled box is its mask) is found too


def test_relative_coordinates_in_pixel_units_and_a_stride_2_mask_head():
    """``rel_coords_scale``: pixel offsets / scale (IDOL: 1); ``mask_stride`` 2: logits at H/2."""
    images = normalize_images(torch.randint(0, 256, (1, 3, 64, 96)))
    base = tiny_model()
    scaled = tiny_model(rel_coords_scale=8.0)
    scaled.load_state_dict(base.state_dict())  # the same weights: only the coordinates differ
    out = scaled(images)
    q = torch.tensor([4])
    h, w = out.mask_size
    xs = torch.arange(w) * 4 + 2
    ys = torch.arange(h) * 4 + 2
    cx, cy = out.boxes[0, 0, 4, :2] * torch.tensor([96.0, 64.0])
    rel = torch.stack((cx - xs[None, :].expand(h, w), cy - ys[:, None].expand(h, w))) / 8.0
    # the dynamic convs written out with pixel offsets / 8 as the coordinate channels
    x = torch.cat((out.mask_features[0], rel)).flatten(1)
    by_hand = _dynamic_convs_by_hand(out.mask_params[0, 0, 4], scaled.cfg.dynamic_dims, x)
    torch.testing.assert_close(scaled.mask_logits(out, 0, 0, q)[0], by_hand.view(h, w))
    assert not torch.allclose(base.mask_logits(base(images), 0, 0, q), scaled.mask_logits(out, 0, 0, q))
    s2 = tiny_model(mask_stride=2)
    out2 = s2(images)
    assert out2.mask_stride == 2 and out2.mask_features.shape[-2:] == (32, 48)
    assert s2.mask_logits(out2, 1, 0, q).shape == (1, 32, 48)
