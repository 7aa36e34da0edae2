"""The VIS model: IDOL (Deformable DETR + CondInst dynamic mask head + contrastive tracking
embedding) and its losses (IDOL, IDOL-BoxInst, PM-VIS pseudo masks, TK-Loss).

Pure PyTorch; every size comes from :class:`ModelConfig`, every loss knob from :class:`LossConfig`.
Clip layout: B clips × T frames are fed as B·T images, clip-major (image b·T + t); frame 0 is the
key frame, frame 1 the reference frame. Normalised coordinates (boxes, reference points) are
relative to each image's own valid (unpadded) region, as Deformable DETR's valid ratios make them.
"""

from .config import LossConfig, ModelConfig
from .criterion import VISCriterion
from .deformable_attention import MSDeformAttn, ms_deform_attn, ms_deform_attn_naive
from .idol import (
    IDOL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_BUILDERS,
    VISOutput,
    build_model,
    normalize_images,
    resize_images,
)
from .matcher import DynamicKMatcher, Match, dynamic_k_assign
from .targets import FrameTargets, box_masks_from_boxes, lab_images, mask_targets, valid_masks, valid_sizes

__all__ = [
    "IDOL", "IMAGENET_MEAN", "IMAGENET_STD", "MODEL_BUILDERS", "DynamicKMatcher", "FrameTargets", "LossConfig",
    "MSDeformAttn", "Match", "ModelConfig", "VISCriterion", "VISOutput", "box_masks_from_boxes", "build_model",
    "dynamic_k_assign", "lab_images", "mask_targets", "ms_deform_attn", "ms_deform_attn_naive", "normalize_images", "resize_images",
    "valid_masks", "valid_sizes",
]
