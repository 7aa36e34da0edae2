"""Deformable DETR's encoder and decoder with iterative box refinement (two-stage off).

Coordinates, as Deformable DETR's valid ratios: every normalised point or box (reference points,
predicted boxes) is relative to each image's own valid (unpadded) region, so what an image's
queries predict does not depend on the canvas it was padded onto. Where a point samples the
padded level maps it is multiplied by that level's valid ratio (w_valid / W_l, h_valid / H_l)
(:func:`valid_ratios`): the encoder's reference points (:func:`encoder_reference_points`) and the
decoder's references (``ref_input``). Padding is also handled by the value masks and the position
encoding (normalised over the valid region).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .deformable_attention import MSDeformAttn, Shapes
from .layers import MLP, inverse_sigmoid


class _FFN(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear2(self.dropout1(F.relu(self.linear1(x))))
        return self.norm(x + self.dropout2(y))


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then the FFN."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = _FFN(dim, ffn_dim, dropout)

    def forward(self, src, pos, reference_points, shapes, padding_mask):
        attn = self.self_attn(src + pos, reference_points, src, shapes, padding_mask)
        return self.ffn(self.norm(src + self.dropout(attn)))


class DecoderLayer(nn.Module):
    """Post-norm: query self-attention, deformable cross-attention to the memory, FFN."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, levels, heads, points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _FFN(dim, ffn_dim, dropout)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, padding_mask):
        q = tgt + query_pos
        attn = self.self_attn(q, q, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.ffn(tgt)


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """``(B, L, 2)``: per image and level, (valid columns / W_l, valid rows / H_l) of the level's
    padding mask ``(B, H_l, W_l)`` (True on padding) — Deformable DETR's ``get_valid_ratio``
    (valid rows counted down the first column, valid columns along the first row)."""
    ratios = []
    for m in masks:
        valid = ~m
        h, w = m.shape[-2:]
        ratios.append(torch.stack((valid[:, 0, :].sum(1) / w, valid[:, :, 0].sum(1) / h), dim=-1))
    return torch.stack(ratios, 1).float()


def encoder_reference_points(shapes: Shapes, ratios: torch.Tensor, device, dtype) -> torch.Tensor:
    """``(B, S, L, 2)``, as Deformable DETR's encoder ``get_reference_points``: every position's
    pixel centre normalised by its level's valid region, ((j + ½)/(r_x·W_l), (i + ½)/(r_y·H_l)),
    then multiplied by each level's valid ratio r (``ratios`` ``(B, L, 2)``, :func:`valid_ratios`)
    to sample that level's padded map at the same relative place of the valid region."""
    ratios = ratios.to(device=device, dtype=dtype)
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys = torch.arange(h, device=device, dtype=dtype) + 0.5
        xs = torch.arange(w, device=device, dtype=dtype) + 0.5
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        ref_x = xx.flatten()[None] / (ratios[:, None, lvl, 0] * w)
        ref_y = yy.flatten()[None] / (ratios[:, None, lvl, 1] * h)
        refs.append(torch.stack((ref_x, ref_y), -1))
    ref = torch.cat(refs, 1)  # (B, S, 2)
    return ref[:, :, None] * ratios[:, None]


class DeformableTransformer(nn.Module):
    """Encoder over the flattened multi-scale maps + decoder with per-layer class / box heads.

    The decoder's box for layer l is sigmoid(box_head_l(h_l) + inverse_sigmoid(ref_l)), with ref_0
    the 2-d point predicted from the query position embedding (only its centre is refined) and
    ref_{l+1} = box_l, detached (iterative box refinement).
    """

    def __init__(self, *, dim: int, ffn_dim: int, dropout: float, levels: int, heads: int, points: int,
                 enc_layers: int, dec_layers: int, num_queries: int, num_classes: int, prior_prob: float) -> None:
        super().__init__()
        self.dim, self.levels = dim, levels
        self.encoder = nn.ModuleList(EncoderLayer(dim, ffn_dim, dropout, levels, heads, points)
                                     for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, ffn_dim, dropout, levels, heads, points)
                                     for _ in range(dec_layers))
        self.level_embed = nn.Parameter(torch.empty(levels, dim))
        self.query_embed = nn.Embedding(num_queries, 2 * dim)
        self.reference_points = nn.Linear(dim, 2)
        self._reset_parameters()
        class_head = nn.Linear(dim, num_classes)
        nn.init.constant_(class_head.bias, -float(torch.log(torch.tensor((1 - prior_prob) / prior_prob))))
        box_head = MLP(dim, dim, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(dec_layers))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(dec_layers))

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.query_embed.weight)

    def encode(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor]):
        """Flatten the levels (adding the level embeddings to the positions) and run the encoder.

        Returns ``memory (B, S, C)``, the level shapes, the flattened padding mask ``(B, S)`` and
        the valid ratios ``(B, L, 2)`` (:func:`valid_ratios`)."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                              for lvl, p in enumerate(pos)], 1)
        ratios = valid_ratios(masks)
        ref = encoder_reference_points(shapes, ratios, src_flat.device, src_flat.dtype)
        memory = src_flat
        for layer in self.encoder:
            memory = layer(memory, pos_flat, ref, shapes, mask_flat)
        return memory, shapes, mask_flat, ratios

    def decode(self, memory: torch.Tensor, shapes: Shapes, mask_flat: torch.Tensor, ratios: torch.Tensor):
        """Returns ``hidden (L, B, Q, C)``, ``logits (L, B, Q, K)``, ``boxes (L, B, Q, 4)`` (cxcywh,
        normalised by each image's valid region) and ``references (L, B, Q, 2)``: the (cx, cy) of
        the reference each layer took as input (layer 0: the initial point, layer l > 0: the detached
        box of layer l − 1; IDOL's ``init_reference`` / ``inter_references[l-1]``, the points its
        mask head measures relative coordinates from). ``ratios``: the valid ratios ``(B, L, 2)``; as in
        Deformable DETR's decoder, a layer's reference (point or box) is multiplied by them
        (a box's (w, h) too) to sample each level's padded map."""
        b = memory.shape[0]
        query_pos, tgt = self.query_embed.weight.split(self.dim, dim=1)
        query_pos = query_pos[None].expand(b, -1, -1)
        tgt = tgt[None].expand(b, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        ratios = ratios.to(memory.dtype)
        hidden, logits, boxes, references = [], [], [], []
        for lid, layer in enumerate(self.decoder):
            references.append(reference[..., :2])
            scale = ratios if reference.shape[-1] == 2 else torch.cat((ratios, ratios), -1)
            ref_input = reference[:, :, None] * scale[:, None]  # (B, Q, L, 2 or 4)
            tgt = layer(tgt, query_pos, ref_input, memory, shapes, mask_flat)
            delta = self.box_heads[lid](tgt)
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                box = torch.cat((delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]), -1).sigmoid()
            hidden.append(tgt)
            logits.append(self.class_heads[lid](tgt))
            boxes.append(box)
            reference = box.detach()
        return torch.stack(hidden), torch.stack(logits), torch.stack(boxes), torch.stack(references)
