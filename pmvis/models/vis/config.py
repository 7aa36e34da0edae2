"""Every knob of the VIS model (:class:`ModelConfig`) and of its losses (:class:`LossConfig`).

Defaults are the paper's (docs/design.md §4.3 IDOL R50 / IDOL-BoxInst, §4.2 TK-Loss, §4.4 PM-VIS);
:meth:`ModelConfig.tiny` is a CPU-sized preset for tests and the demo.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pmvis.core.config import StrictConfig


class ModelConfig(StrictConfig):
    """IDOL: Deformable DETR with box refinement + CondInst dynamic mask head + tracking embedding."""

    architecture: Literal["idol"] = "idol"
    # --- backbone: any timm model that supports features_only
    backbone: str = "resnet50"
    backbone_weights: str | None = None  # a local state-dict file (torch.save); never downloaded
    # Frozen BN, as Deformable DETR, for pretrained weights. Set False when training from scratch:
    # timm ResNets zero-init each block's last BN scale, which frozen BN would keep at zero.
    freeze_backbone_bn: bool = True
    # strides of the backbone features fed to the transformer; further levels are stride-2 convs
    backbone_strides: tuple[int, ...] = (8, 16, 32)
    # --- deformable transformer
    hidden_dim: int = 256
    num_queries: int = 300
    enc_layers: int = 6
    dec_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    num_feature_levels: int = 4
    ffn_dim: int = 1024
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    norm_groups: int = 32  # GroupNorm groups of the input projections and the mask branch
    # --- CondInst dynamic mask head
    # "idol": IDOL's head (VNext MaskHeadSmallConv over the stride-8/16/32 encoder memory, no norm,
    # mask_channels at stride 8, dynamic convs at stride 8 then ×2 to stride 4, relative coordinates
    # in pixels (÷ rel_coords_scale, None = 1) from each decoder layer's input reference point):
    # loads VNext IDOL checkpoints (`pmvis import-checkpoint --format idol`). "fpn": pmvis's first
    # branch (stride-4 FPN over the memory + a backbone lateral, GroupNorm; offsets from the layer's
    # predicted box centre), the tiny CPU model's.
    mask_head: Literal["idol", "fpn"] = "idol"
    mask_stride: Literal[2, 4] = 4  # mask logits at H/s × W/s (fpn: also its features, the stride-s backbone feature)
    mask_branch_channels: int = 128
    mask_branch_convs: int = 2
    mask_channels: int = 8  # mask feature channels fed to the dynamic convs (IDOL: hidden/32)
    dynamic_channels: int = 8
    dynamic_layers: int = 3
    rel_coords: bool = True
    # Pixels per unit of the relative coordinates; None: the image's width/height (pmvis's first
    # normalisation, offsets of a 16 px object span ±0.05 on a 160 px frame). IDOL passes raw pixel
    # offsets (1.0); CondInst divides by the level's size of interest (64 at P3).
    rel_coords_scale: float | None = Field(None, gt=0)
    # --- heads
    embed_dim: int = 256  # contrastive tracking embedding
    num_classes: int = Field(40, ge=1)
    prior_prob: float = Field(0.01, gt=0.0, lt=1.0)  # focal-loss bias init of the class heads

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        positive = ("hidden_dim", "num_queries", "enc_layers", "dec_layers", "num_heads", "num_points",
                    "num_feature_levels", "ffn_dim", "norm_groups", "mask_branch_channels", "mask_channels",
                    "dynamic_channels", "dynamic_layers", "embed_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.mask_branch_convs < 0:
            raise ValueError(f"mask_branch_convs must be ≥ 0, got {self.mask_branch_convs}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (sine position encoding), got {self.hidden_dim}")
        for name in ("hidden_dim", "mask_branch_channels"):
            if getattr(self, name) % self.norm_groups:
                raise ValueError(f"{name} {getattr(self, name)} must be divisible by norm_groups {self.norm_groups}")
        strides = self.backbone_strides
        if not strides:
            raise ValueError("backbone_strides must not be empty")
        if any(s <= self.mask_stride for s in strides) or list(strides) != sorted(set(strides)):
            raise ValueError(f"backbone_strides must be increasing and > mask_stride {self.mask_stride}, "
                             f"got {list(strides)}")
        if self.mask_head == "idol":
            if len(strides) != 3:
                raise ValueError(f"mask_head 'idol' reads three memory levels (IDOL: strides 8, 16, 32), got "
                                 f"backbone_strides {list(strides)}")
            if strides[0] % self.mask_stride or self.hidden_dim % 4:
                raise ValueError(f"mask_head 'idol' needs backbone_strides[0] a multiple of mask_stride "
                                 f"{self.mask_stride} and hidden_dim a multiple of 4")
        if self.num_feature_levels < len(strides):
            raise ValueError(f"num_feature_levels {self.num_feature_levels} < number of backbone_strides "
                             f"{len(strides)}")
        return self

    @property
    def num_mask_params(self) -> int:
        """Dynamic-conv parameters per query: weights + biases of every 1×1 layer."""
        dims = self.dynamic_dims
        return sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))

    @property
    def dynamic_dims(self) -> list[int]:
        """Channel sizes of the dynamic 1×1 convs: input (mask + 2 coords), hidden…, output 1."""
        first = self.mask_channels + (2 if self.rel_coords else 0)
        return [first] + [self.dynamic_channels] * (self.dynamic_layers - 1) + [1]

    @property
    def feature_strides(self) -> list[int]:
        """The stride of every transformer level (backbone levels, then the extra stride-2 levels)."""
        extra = self.num_feature_levels - len(self.backbone_strides)
        last = self.backbone_strides[-1]
        return list(self.backbone_strides) + [last * 2 ** (i + 1) for i in range(extra)]

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A CPU-sized model (RegNetX-400MF, hidden 32, 50 queries; 0.63 M parameters) for 64–160 px frames.

        Measured (benchmarks/README.md, time to accuracy): RegNetX-400MF is 3× faster per step than
        ResNet-18 at a quarter of the parameters, and 50 queries with 4 sampling points learn boxes
        far sooner than 10 queries with 2 (SimOTA gives each object several positive queries).
        """
        values: dict[str, Any] = dict(
            backbone="regnetx_004", freeze_backbone_bn=False, mask_head="fpn", backbone_strides=(8, 16), hidden_dim=32,
            num_queries=50, enc_layers=1, dec_layers=2, num_heads=2, num_points=4, num_feature_levels=2,
            ffn_dim=64, norm_groups=8, mask_branch_channels=16, mask_branch_convs=1, embed_dim=32,
        )
        values.update(overrides)
        return cls(**values)


class LossConfig(StrictConfig):
    """Loss terms and weights of IDOL / IDOL-BoxInst / PM-VIS / TK-Loss and the matcher's costs.

    ``mode``: ``boxinst`` — BoxInst projection + pairwise mask losses (box labels only);
    ``pmvis`` — boxinst + focal/dice against pseudo masks; ``full`` — focal/dice against GT masks.
    """

    mode: Literal["boxinst", "pmvis", "full"] = "boxinst"
    # Frames that get the detection and mask losses: IDOL / IDOL-BoxInst use the key frame only
    # (the reference frame feeds the tracking loss); "all" supervises every frame of the clip.
    loss_frames: Literal["key", "all"] = "key"
    # --- detection (every decoder layer)
    class_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    # --- SimOTA dynamic-k matcher (docs/design.md §4.3: focal-class + 3·(−GIoU) + 100·(not in box ∩ centre))
    match_class_cost: float = 1.0
    match_l1_cost: float = 0.0  # IDOL's configs also list L1 5 / class 2 / GIoU 2; set them here
    match_giou_cost: float = 3.0
    match_center_cost: float = 100.0
    match_outside_cost: float = 10000.0  # queries whose centre is in no GT box and no centre region
    match_topk: int = Field(10, ge=1)  # dynamic k = clamp(Σ top-k IoUs, min 1)
    # centre region: GT centre ± center_radius / center_stride (normalised; IDOL: 2.5 / 32)
    center_radius: float = Field(2.5, gt=0.0)
    center_stride: float = Field(32.0, gt=0.0)
    # --- BoxInst (docs/design.md §4.1); the PM-VIS authors' IDOL-BoxInst weights both terms 2.0
    # (AdelaiDet's BoxInst: 1.0 each)
    projection_weight: float = 2.0
    pairwise_weight: float = 2.0
    pairwise_size: int = 3
    pairwise_dilation: int = 2
    pairwise_threshold: float = 0.3
    pairwise_warmup_iters: int = 10000
    bottom_pixels_removed: int = 10  # image rows ignored by the pairwise loss (AdelaiDet)
    # --- mask focal / dice ("full": GT masks; "pmvis": pseudo masks, docs/design.md §4.4)
    mask_focal_weight: float = 2.0
    mask_dice_weight: float = 5.0
    pseudo_focal_weight: float = 2.0
    pseudo_dice_weight: float = 5.0
    # True: weight each instance's pseudo-mask loss by its quality (pseudo_weights); False: weights
    # only switch it off (weight 0 = no pseudo mask for that instance).
    pseudo_quality_weighting: bool = False
    # True: divide each instance's pseudo-mask focal and dice terms by its mask quality (the PM-VIS
    # authors' final loss: ÷ the per-instance SAM IoU, then Σ / N), the quality floored at
    # pseudo_quality_floor so a zero quality cannot divide by zero (no quality recorded: weight 1)
    pseudo_divide_by_quality: bool = False
    pseudo_quality_floor: float = Field(0.05, gt=0.0, le=1.0)
    # --- TK-Loss (MaskFreeVIS, docs/design.md §4.2)
    tk: bool = False
    tk_weight: float = 0.5  # 0.1 × 5 per frame pair; the TK-Loss is the sum over pairs
    tk_patch_size: int = 3
    tk_window: int = 3
    tk_dilation: int = 3
    tk_k: int = 5
    tk_threshold: float = 0.05
    tk_cyclic: bool = False
    # Linear warm-up of the TK term over this many TK-loss calls, counted as MaskFreeVIS counts
    # them: one call per decoder layer and iteration (VISCriterion.tk_warmup_call), so MaskFreeVIS's
    # 2,000 calls last 2000 / dec_layers iterations (~334 with IDOL's 6 layers). 0: no warm-up.
    tk_warmup_calls: int = Field(2000, ge=0)
    # --- contrastive tracking (IDOL): key frame t=0 vs reference frame t=1
    track_weight: float = 2.0
    track_aux_weight: float = 3.0
    # negatives: the reference queries a dynamic-k assignment over the top track_neg_topk IoUs (IDOL:
    # 100) does not give to the instance (models/vis/tracking_loss.py)
    track_neg_topk: int = Field(100, ge=1)
    track_aux_negatives: int = Field(10, ge=1)  # aux cosine term: at most this many negatives per positive

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tk_warmup_iters" in data:
            raise ValueError("tk_warmup_iters is now tk_warmup_calls and counts TK-loss calls, one per decoder "
                             "layer and iteration (as MaskFreeVIS): an old value × dec_layers keeps its length")
        return data

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        for name in ("pairwise_size", "tk_patch_size", "tk_window"):
            v = getattr(self, name)
            if v < 1 or v % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer, got {v}")
        for name in ("pairwise_dilation", "tk_dilation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 1 <= self.tk_k <= self.tk_window ** 2:
            raise ValueError(f"tk_k must be in 1..tk_window² = {self.tk_window ** 2}, got {self.tk_k}")
        if self.pseudo_quality_weighting and self.pseudo_divide_by_quality:
            raise ValueError("pseudo_quality_weighting (× quality) and pseudo_divide_by_quality (÷ quality) "
                             "exclude each other")
        if self.bottom_pixels_removed < 0:
            raise ValueError(f"bottom_pixels_removed must be ≥ 0, got {self.bottom_pixels_removed}")
        return self
