"""HQ-SAM pseudo masks (docs/design.md §4.4): every ground-truth box prompts HQ-SAM on its frame.

Per frame with at least one box: ONE image embedding (``SamPredictor.set_image``), then ALL of the
frame's boxes decoded in ONE batched ``predict_torch`` call (``multimask_output=False``,
``hq_token_only`` from the config: False, SAM + HQ logits, suits multi-object scenes). Frames
without boxes are not embedded at all.

- **Mask:** the decoder's single mask per box at the frame's size (bool).
- **Confidence:** the decoder's predicted-IoU score for that mask, clipped to [0, 1] (the IoU head
  is an unconstrained regression; trained models stay close to [0, 1]).
- **Boxes** go through the predictor's own ``transform.apply_boxes`` (the path ``predict`` takes),
  so a batched call sees exactly the prompt coordinates a one-box ``predict`` call would.

Weights: ``segment_anything_hq.sam_model_registry[model_type](checkpoint=None)`` builds the model;
a ``checkpoint`` path (``sam_hq_vit_*.pth``) is then loaded here, safely:
``torch.load(map_location="cpu", weights_only=True)`` (the package's own loader uses a bare
``torch.load`` without ``map_location``); missing or mis-shaped parameters are a PmvisError naming
the file, unknown extra ones are logged and ignored (the package loads non-strictly too). Without
a checkpoint the model keeps random weights (seeded by ``random_init_seed``) and a loud warning is
logged: for tests and demos only.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import Field

from pmvis.models.sources._common import box_xyxy, clip01, empty_tracks, resolve_device, warn_random_weights
from pmvis.models.sources.base import SourceConfig, SourceMasks, SourceSpec, VideoInput, register_source
from pmvis.models.torch_files import load_state_dict_strict, load_torch_file, state_dict_from

NAME = "hqsam"
log = logging.getLogger("pmvis.sources.hqsam")


class HQSamConfig(SourceConfig):
    model_type: Literal["vit_h", "vit_l", "vit_b", "vit_tiny"] = "vit_tiny"
    checkpoint: str | None = Field(None, description="sam_hq_vit_*.pth; null: random weights (tests/demos)")
    hq_token_only: bool = Field(False, description="HQ mask only (False: SAM + HQ, for multi-object scenes)")
    device: str | None = Field(None, description='null: "cuda" if num_gpus > 0 and CUDA is available, else "cpu"')
    random_init_seed: int = Field(0, ge=0, description="torch seed for the random weights when no checkpoint")


def build_hqsam_model(model_type: str, checkpoint: str | None, *, device: str = "cpu", random_init_seed: int = 0):
    """The HQ-SAM ``Sam`` model in eval mode on ``device``, weights from ``checkpoint`` or random."""
    import torch
    from segment_anything_hq import sam_model_registry

    what = f"HQ-SAM {model_type}"
    # Random init happens inside the builder: seed it without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed)
        model = sam_model_registry[model_type](checkpoint=None)
    if checkpoint is None:
        warn_random_weights(what)
    else:
        loaded = load_torch_file(checkpoint, f"{what} checkpoint")
        # Unexpected keys are tolerated (logged), as the package's own non-strict loader does;
        # missing or mis-shaped ones are errors.
        state = state_dict_from(loaded, checkpoint, f"{what} checkpoint", keys=("model", "state_dict"))
        load_state_dict_strict(model, state, checkpoint, f"{what} checkpoint", allow_unexpected=True)
        log.info("%s: loaded weights from %s", what, checkpoint)
    return model.to(device).eval()


class HQSamSource:
    name = NAME

    def __init__(self, config: HQSamConfig):
        from segment_anything_hq import SamPredictor

        self.config = config
        self.device = resolve_device(config.device, config.num_gpus)
        self.model = build_hqsam_model(config.model_type, config.checkpoint, device=self.device,
                                       random_init_seed=config.random_init_seed)
        self.predictor = SamPredictor(self.model)

    def predict_frame(self, image: np.ndarray, boxes_xyxy: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One embedding + one batched decode of ``(N, 4)`` xyxy boxes: (N, H, W) bool masks, (N,) raw
        predicted IoUs and the (N, 256, 256) low-resolution mask logits."""
        import torch

        p = self.predictor
        with torch.inference_mode():
            p.set_image(image, image_format="RGB")
            prompts = p.transform.apply_boxes(np.asarray(boxes_xyxy, dtype=np.float64), p.original_size)
            prompts = torch.as_tensor(prompts, dtype=torch.float, device=p.device)
            masks, iou, low_res = p.predict_torch(point_coords=None, point_labels=None, boxes=prompts,
                                            multimask_output=False, hq_token_only=self.config.hq_token_only)
            out = (masks[:, 0].cpu().numpy().astype(bool), iou[:, 0].float().cpu().numpy(),
                   low_res[:, 0].float().cpu().numpy())
        p.reset_image()
        return out

    def __call__(self, video: VideoInput) -> dict[int, SourceMasks]:
        out = empty_tracks(video)
        for t in range(video.length):
            items = [(aid, boxes[t]) for aid, boxes in video.boxes.items() if boxes[t] is not None]
            if not items:
                continue
            masks, ious, _ = self.predict_frame(video.frames[t], np.array([box_xyxy(b) for _, b in items]))
            for (aid, _), m, s in zip(items, masks, ious):
                out[aid].masks[t] = m
                out[aid].confidences[t] = clip01(float(s))
        return out


register_source(NAME, SourceSpec(config_cls=HQSamConfig, build=HQSamSource, uses_model=True))
