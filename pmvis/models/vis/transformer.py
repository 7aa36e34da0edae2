"""Deformable DETR's encoder and decoder with iterative box refinement (two-stage off).

Coordinates: every normalised point or box (reference points, predicted boxes) is relative to the
padded input canvas (W, H) of the batch, so no valid-ratio rescaling is needed; padding is handled
by the value masks and the position encoding.
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


def encoder_reference_points(shapes: Shapes, levels: int, batch: int, device, dtype) -> torch.Tensor:
    """``(B, S, L, 2)``: every position's pixel centre ((j + ½)/W_l, (i + ½)/H_l), the same
    normalised point on all L levels."""
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((xx.flatten(), yy.flatten()), -1))
    ref = torch.cat(refs, 0)
    return ref[None, :, None, :].expand(batch, -1, levels, -1)


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

        Returns ``memory (B, S, C)``, the level shapes and the flattened padding mask ``(B, S)``."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                              for lvl, p in enumerate(pos)], 1)
        ref = encoder_reference_points(shapes, self.levels, src_flat.shape[0], src_flat.device, src_flat.dtype)
        memory = src_flat
        for layer in self.encoder:
            memory = layer(memory, pos_flat, ref, shapes, mask_flat)
        return memory, shapes, mask_flat

    def decode(self, memory: torch.Tensor, shapes: Shapes, mask_flat: torch.Tensor):
        """Returns ``hidden (L, B, Q, C)``, ``logits (L, B, Q, K)``, ``boxes (L, B, Q, 4)`` (cxcywh)."""
        b = memory.shape[0]
        query_pos, tgt = self.query_embed.weight.split(self.dim, dim=1)
        query_pos = query_pos[None].expand(b, -1, -1)
        tgt = tgt[None].expand(b, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        hidden, logits, boxes = [], [], []
        for lid, layer in enumerate(self.decoder):
            ref_input = reference[:, :, None].expand(-1, -1, self.levels, -1)
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
        return torch.stack(hidden), torch.stack(logits), torch.stack(boxes)
