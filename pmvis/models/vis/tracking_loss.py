"""IDOL's contrastive tracking loss between a clip's key frame (t=0) and reference frame (t=1).

Anchors: the key-frame queries matched to an instance (dynamic-k). Positives: the reference-frame
queries the same matcher assigns to the same instance id (OTA: dynamic k of the top-10).
Negatives: the reference queries ranked, by matching cost for that instance, outside the top
``neg_boundary`` (and not positive). Per anchor k with positive / negative embeddings v⁺ / v⁻:

    contrastive = log(1 + Σ_{v⁺} Σ_{v⁻} exp(k·v⁻ − k·v⁺))
    aux = mean over v ∈ v⁺ ∪ v⁻ of (cos(k, v) − [v ∈ v⁺])²

both averaged over the anchors of the batch (dot products of the raw embeddings, as IDOL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .matcher import Match


def negative_boundary(num_queries: int, neg_topk: int) -> int:
    """IDOL's top-100 of 300 queries, scaled: min(neg_topk, ⌈Q / 3⌉)."""
    return max(1, min(neg_topk, math.ceil(num_queries / 3)))


def contrastive_pairs(key: Match, ref: Match, key_ids: torch.Tensor, ref_ids: torch.Tensor,
                      neg_boundary: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per anchor: (key query, positive reference queries, negative reference queries)."""
    out = []
    ref_pos = {int(i): ref.query_idx[ref.gt_idx == g] for g, i in enumerate(ref_ids.tolist())}
    num_queries = ref.cost.shape[0]
    for qk, gk in zip(key.query_idx.tolist(), key.gt_idx.tolist()):
        inst = int(key_ids[gk])
        pos = ref_pos.get(inst)
        if pos is None or pos.numel() == 0:
            continue
        gr = int((ref_ids == inst).nonzero()[0, 0])
        ranked = ref.cost[:, gr].argsort()
        is_neg = torch.ones(num_queries, dtype=torch.bool, device=ranked.device)
        is_neg[ranked[:neg_boundary]] = False
        is_neg[pos] = False
        neg = is_neg.nonzero().squeeze(1)
        if neg.numel():
            out.append((qk, pos, neg))
    return out


def tracking_losses(anchors: torch.Tensor, positives: list[torch.Tensor],
                    negatives: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``anchors`` ``(A, E)``; per anchor positive ``(P_a, E)`` and negative ``(N_a, E)`` embeddings →
    (contrastive, aux) averaged over the anchors."""
    contrast, aux = [], []
    for k, pos, neg in zip(anchors, positives, negatives):
        sp, sn = pos @ k, neg @ k
        contrast.append(F.softplus(torch.logsumexp((sn[None, :] - sp[:, None]).flatten(), 0)))
        cand = torch.cat((pos, neg))
        target = torch.cat((torch.ones_like(sp), torch.zeros_like(sn)))
        aux.append((F.cosine_similarity(cand, k[None], dim=1) - target).square().mean())
    return torch.stack(contrast).mean(), torch.stack(aux).mean()
