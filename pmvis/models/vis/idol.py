"""IDOL (ECCV 2022): Deformable DETR with box refinement + CondInst dynamic mask head + a
contrastive tracking embedding, all sizes from :class:`ModelConfig`.

Layout conventions: a clip batch of B clips × T frames is fed as B·T images, clip-major (image
b·T + t is frame t of clip b). Boxes are normalised (cx, cy, w, h) relative to each image's own
valid (unpadded) region (w_img, h_img), as in Deformable DETR / IDOL (valid ratios, see
:mod:`.transformer`), so an image's outputs do not depend on the canvas; mask logits are at stride 4
of the padded canvas, and :attr:`VISOutput.image_sizes` holds each image's (h_img, w_img).

Two mask heads (``model.mask_head``): ``idol`` is IDOL's own, weight-compatible with VNext's
checkpoints (:class:`~.mask_head.IdolMaskHead`: mask features at stride 8 from the encoder memory,
relative coordinates in pixels from each layer's input reference point, logits upsampled ×2);
``fpn`` is pmvis's earlier branch (stride-4 features with a backbone lateral and GroupNorm, offsets
from the layer's predicted box centre), kept for the tiny CPU model and its shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .config import ModelConfig
from .layers import MLP
from .mask_head import Controller, IdolMaskHead, MaskBranch, dynamic_mask_logits, upsample_aligned
from .position_encoding import sine_position_encoding
from .targets import valid_sizes
from .transformer import DeformableTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 255] (uint8 or float) → float32 ImageNet-normalised."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = images.to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_images(images: torch.Tensor, size: tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """Float RGB ``(B, 3, H, W)`` in [0, 255] → ``(B, 3, *size)``, bilinear; a downscale is
    antialiased (PIL's bilinear, which detectron2's ``ResizeShortestEdge`` uses in IDOL, does the
    same) unless ``antialias`` is False. The one resize of training clips and inference frames, so
    a model sees at test time the kind of image it was trained on."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    down = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    x = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias and down)
    return x.clamp(0, 255)


@dataclass(eq=False)
class VISOutput:
    """What :meth:`IDOL.forward` returns for B images (L decoder layers, Q queries)."""

    logits: torch.Tensor  # (L, B, Q, num_classes), sigmoid class logits
    boxes: torch.Tensor  # (L, B, Q, 4) (cx, cy, w, h) normalised by each image's valid size
    mask_params: torch.Tensor  # (L, B, Q, P) dynamic-conv parameters
    mask_features: torch.Tensor  # (B, Cm, H/f, W/f), f = feature_stride
    embeddings: torch.Tensor  # (B, Q, E) tracking embeddings of the last layer
    hidden: torch.Tensor  # (L, B, Q, C) decoder outputs
    image_size: tuple[int, int]  # (H, W) of the padded input
    mask_stride: int  # mask logits are at H/mask_stride × W/mask_stride
    image_sizes: torch.Tensor  # (B, 2) long (h_img, w_img): each image's valid size (targets.valid_sizes)
    references: torch.Tensor | None = None  # (L, B, Q, 2) each layer's input reference (cx, cy)
    feature_stride: int | None = None  # stride of mask_features (None: mask_stride)

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    @property
    def num_queries(self) -> int:
        return self.logits.shape[2]

    @property
    def mask_size(self) -> tuple[int, int]:
        """(H, W) / mask_stride: the size of the mask logits and of the mask targets."""
        return self.image_size[0] // self.mask_stride, self.image_size[1] // self.mask_stride


# (output, layer, batch_idx (N,), query_idx (N,)) -> (N, H/4, W/4) mask logits
MaskLogitsFn = Callable[[VISOutput, int, torch.Tensor, torch.Tensor], torch.Tensor]


def _gn(cfg: ModelConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, cfg.hidden_dim)


class IDOL(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        idol_head = cfg.mask_head == "idol"  # IDOL's mask branch reads only the encoder memory
        self.backbone = Backbone(cfg.backbone, list(cfg.backbone_strides) if idol_head else
                                 [cfg.mask_stride, *cfg.backbone_strides],
                                 weights=cfg.backbone_weights, freeze_bn=cfg.freeze_backbone_bn)
        d = cfg.hidden_dim
        proj = [nn.Sequential(nn.Conv2d(self.backbone.channels[s], d, 1), _gn(cfg)) for s in cfg.backbone_strides]
        in_ch = self.backbone.channels[cfg.backbone_strides[-1]]
        for _ in range(cfg.num_feature_levels - len(cfg.backbone_strides)):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, stride=2, padding=1), _gn(cfg)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight)
            nn.init.zeros_(p[0].bias)
        self.transformer = DeformableTransformer(
            dim=d, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, levels=cfg.num_feature_levels, heads=cfg.num_heads,
            points=cfg.num_points, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
            num_queries=cfg.num_queries, num_classes=cfg.num_classes, prior_prob=cfg.prior_prob)
        if idol_head:
            self.mask_head = IdolMaskHead(d, d // 4, cfg.mask_channels)
        else:
            self.mask_branch = MaskBranch(
                memory_dim=d, levels=len(cfg.backbone_strides),
                stride4_channels=self.backbone.channels[cfg.mask_stride],
                channels=cfg.mask_branch_channels, convs=cfg.mask_branch_convs, out_channels=cfg.mask_channels,
                groups=cfg.norm_groups)
        self.controller = Controller(d, cfg.num_mask_params)
        self.embed_head = MLP(d, d, cfg.embed_dim, 3)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> VISOutput:
        """``images`` ``(B, 3, H, W)`` normalised (:func:`normalize_images`), H and W multiples of
        the mask stride; ``padding_mask`` ``(B, H, W)`` True on padding (None: no padding)."""
        cfg = self.cfg
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        b, _, h, w = images.shape
        if h % cfg.mask_stride or w % cfg.mask_stride:
            raise ValueError(f"image size {h}×{w} must be a multiple of the mask stride {cfg.mask_stride}")
        if padding_mask is None:
            padding_mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        elif padding_mask.shape != (b, h, w):
            raise ValueError(f"padding_mask must be ({b}, {h}, {w}), got {tuple(padding_mask.shape)}")
        feats = self.backbone(images)
        srcs, masks, pos = [], [], []
        for lvl, proj in enumerate(self.input_proj):
            if lvl < len(cfg.backbone_strides):
                x = proj(feats[cfg.backbone_strides[lvl]])
            else:
                x = proj(feats[cfg.backbone_strides[-1]] if lvl == len(cfg.backbone_strides) else srcs[-1])
            m = F.interpolate(padding_mask[None].float(), size=x.shape[-2:])[0].to(torch.bool)
            srcs.append(x)
            masks.append(m)
            pos.append(sine_position_encoding(m, cfg.hidden_dim).to(x.dtype))
        memory, shapes, mask_flat, ratios = self.transformer.encode(srcs, masks, pos)
        hidden, logits, boxes, references = self.transformer.decode(memory, shapes, mask_flat, ratios)
        n_maps = len(cfg.backbone_strides)
        sizes = [hh * ww for hh, ww in shapes]
        maps = [m.transpose(1, 2).reshape(b, cfg.hidden_dim, hh, ww)
                for m, (hh, ww) in zip(memory.split(sizes, 1)[:n_maps], shapes[:n_maps])]
        if cfg.mask_head == "idol":
            mask_features, feature_stride = self.mask_head(maps), cfg.backbone_strides[0]
        else:
            mask_features, feature_stride = self.mask_branch(maps, feats[cfg.mask_stride]), cfg.mask_stride
        return VISOutput(
            logits=logits, boxes=boxes, mask_params=self.controller(hidden), mask_features=mask_features,
            embeddings=self.embed_head(hidden[-1]), hidden=hidden, image_size=(h, w), mask_stride=cfg.mask_stride,
            image_sizes=valid_sizes(padding_mask), references=references, feature_stride=feature_stride)

    def mask_logits(
        self, output: VISOutput, layer: int, batch_index: int | torch.Tensor, query_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits ``(N, H/4, W/4)`` of the N queries ``query_idx`` of decoder layer ``layer``.

        ``batch_index``: one image index for all, or ``(N,)`` per-query image indices."""
        query_idx = torch.as_tensor(query_idx, dtype=torch.long, device=output.mask_features.device).reshape(-1)
        if isinstance(batch_index, torch.Tensor):
            batch_idx = batch_index.to(device=query_idx.device, dtype=torch.long).reshape(-1)
        else:
            batch_idx = torch.full_like(query_idx, int(batch_index))
        if batch_idx.shape != query_idx.shape:
            raise ValueError(f"batch_index {tuple(batch_idx.shape)} and query_idx {tuple(query_idx.shape)} differ")
        params = output.mask_params[layer, batch_idx, query_idx]
        cfg = self.cfg
        if cfg.mask_head == "idol":
            # IDOL: pixel offsets from the reference point the layer took as input, coordinates first,
            # dynamic convs at the feature stride, logits upsampled (aligned) to the mask stride
            centres = output.references[layer, batch_idx, query_idx] if cfg.rel_coords else None
            stride = output.feature_stride
            logits = dynamic_mask_logits(output.mask_features, params, centres, batch_idx, dims=cfg.dynamic_dims,
                                         stride=stride, image_sizes=output.image_sizes[batch_idx],
                                         coord_scale=cfg.rel_coords_scale or 1.0, coords_first=True)
            return upsample_aligned(logits[:, None], stride // output.mask_stride)[:, 0]
        centres = output.boxes[layer, batch_idx, query_idx, :2].detach() if cfg.rel_coords else None
        return dynamic_mask_logits(output.mask_features, params, centres, batch_idx, dims=cfg.dynamic_dims,
                                   stride=output.mask_stride, image_sizes=output.image_sizes[batch_idx],
                                   coord_scale=cfg.rel_coords_scale)


def build_model(cfg: ModelConfig) -> IDOL:
    return IDOL(cfg)


MODEL_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {"idol": build_model}
