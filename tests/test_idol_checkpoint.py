"""VNext IDOL checkpoints: `pmvis import-checkpoint --format idol` maps every official tensor onto the
weight-compatible `model.mask_head: idol` variant, and the result runs inference.

The official tensor names and shapes are in tests/idol_r50_ytvis19_manifest.json, derived from
VNext's model code (the released files are on Google Drive, out of reach here): a state dict with
those names and shapes and random values stands in for the released file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pmvis.cli import main
from pmvis.core.errors import PmvisError
from pmvis.models.vis.backbone import Backbone
from pmvis.models.vis.checkpoint import load_model
from pmvis.models.vis.convert_idol import ALIAS_PREFIX, BODY, convert_idol_state_dict, idol_model_config
from pmvis.models.vis.inference import InferenceConfig, predict_video

MANIFEST = Path(__file__).with_name("idol_r50_ytvis19_manifest.json")


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under VNext IDOL R50 YTVIS-19's names and shapes; the decoder's bbox_embed
    aliases share their twins' values, as in a real checkpoint."""
    tensors = json.loads(MANIFEST.read_text())["tensors"]
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in tensors
             if not name.startswith(ALIAS_PREFIX)}
    for name, _ in tensors:
        if name.startswith(ALIAS_PREFIX):
            state[name] = state[BODY + "bbox_embed." + name[len(ALIAS_PREFIX):]]
    # running variances must be positive for FrozenBatchNorm's rsqrt
    return {k: (v.abs() + 1.0 if k.endswith("running_var") else v) for k, v in state.items()}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    state = official_state()
    path = tmp_path_factory.mktemp("idol") / "idol_r50_ytvis19.pth"
    torch.save({"model": state, "iteration": 12000}, path)
    return path, state


def test_manifest_is_idols_r50_ytvis19():
    tensors = json.loads(MANIFEST.read_text())["tensors"]
    names = [n for n, _ in tensors]
    assert len(tensors) == 619 and len(set(names)) == 619
    assert sum(n.startswith(ALIAS_PREFIX) for n in names) == 36
    shapes = dict((n, tuple(s)) for n, s in tensors)
    assert shapes[BODY + "class_embed.5.weight"] == (40, 256)
    assert shapes["detr.controller.layers.2.weight"] == (169, 256)
    assert shapes["detr.mask_head.lay2.weight"] == (8, 64, 3, 3)


def test_official_tensors_convert_one_to_one_and_run_inference(official, tmp_path):
    path, state = official
    out = tmp_path / "idol.pt"
    assert main(["import-checkpoint", "--format", "idol", str(path), "--out", str(out)]) == 0
    model, cfg, ckpt = load_model(out)
    assert cfg.mask_head == "idol" and cfg.num_classes == 40 and cfg.num_queries == 300
    assert ckpt["extra"]["category_ids"] == list(range(1, 41))
    own = model.state_dict()
    # 0 left over, 0 missing: every official tensor is one pmvis tensor, value for value
    target = convert_idol_state_dict(state, own)
    assert set(target) == set(own) and len(own) == 619 - 36
    assert torch.equal(own["transformer.decoder.3.norm1.weight"],
                       state[BODY + "transformer.decoder.layers.3.norm2.weight"])  # IDOL's post-self-attention norm
    assert torch.equal(own["backbone.body.layer3.2.bn2.running_var"],
                       state[BODY + "backbone.0.backbone.res4.2.conv2.norm.running_var"])
    assert torch.equal(own["mask_head.dcn.weight"], state["detr.mask_head.dcn.weight"])
    assert torch.equal(own["embed_head.layers.2.bias"], state["detr.reid_embed_head.layers.2.bias"])
    # inference on a synthetic clip: 3 frames with a bright square moving right
    frames = np.zeros((3, 64, 96, 3), dtype=np.uint8)
    for t in range(3):
        frames[t, 20:40, 10 + 8 * t:30 + 8 * t] = (200, 60, 40)
    torch.manual_seed(0)
    tracks = predict_video(model, frames, InferenceConfig(test_short_side=None, test_max_size=None))
    assert tracks, "the top-1 fallback keeps at least one query per frame"
    for tr in tracks:
        for t, det in tr.detections.items():
            assert det.class_scores.shape == (40,) and 0 <= t < 3
            assert det.mask["size"] == [64, 96]


def test_left_over_and_missing_tensors_are_named(official, tmp_path):
    _, state = official
    broken = dict(state)
    del broken[BODY + "transformer.encoder.layers.0.linear1.weight"]
    broken["detr.something_new.weight"] = torch.zeros(3)
    cfg = idol_model_config(broken)
    from pmvis.models.vis import build_model

    with pytest.raises(PmvisError) as e:
        convert_idol_state_dict(broken, build_model(cfg).state_dict(), source="ckpt.pth")
    msg = str(e.value)
    assert "1 tensors left over: detr.something_new.weight" in msg
    assert "1 parameters missing: transformer.encoder.0.ffn.linear1.weight" in msg
    # an alias that differs from its twin is not silently dropped
    twin = dict(state)
    twin[ALIAS_PREFIX + "0.layers.0.bias"] = twin[ALIAS_PREFIX + "0.layers.0.bias"] + 1
    with pytest.raises(PmvisError, match="1 aliased tensors that differ"):
        convert_idol_state_dict(twin, build_model(cfg).state_dict())
    # a mis-shaped tensor (another class count would be read off class_embed, so change a query row)
    bad = dict(state)
    bad["detr.mask_head.lay1.bias"] = torch.zeros(65)
    with pytest.raises(PmvisError, match=r"1 shape mismatches: detr.mask_head.lay1.bias \(65,\)"):
        convert_idol_state_dict(bad, build_model(cfg).state_dict())
    # the CLI says so and exits 2, writing nothing
    path = tmp_path / "broken.pth"
    torch.save({"model": broken}, path)
    assert main(["import-checkpoint", "--format", "idol", str(path), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_detectron2_named_resnet50_loads_as_backbone_weights(official, tmp_path):
    _, state = official
    prefix = BODY + "backbone.0.backbone."
    d2 = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    path = tmp_path / "R-50.pt"
    torch.save({"model": d2}, path)
    backbone = Backbone("resnet50", [8, 16, 32], weights=str(path))
    assert torch.equal(backbone.body.state_dict()["layer1.0.downsample.0.weight"], d2["res2.0.shortcut.weight"])
    assert torch.equal(backbone.body.state_dict()["bn1.running_mean"], d2["stem.conv1.norm.running_mean"])
