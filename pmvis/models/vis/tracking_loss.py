"""IDOL's contrastive tracking loss between a clip's key frame (t=0) and reference frame (t=1).

Sample selection as VNext IDOL's ``pos_neg_select.py``, for every instance present in both frames:

* **anchor**: one key-frame query, the instance's cheapest matched query (:attr:`Match.primary`);
* **positives**: the reference-frame queries the matcher assigns to the instance (dynamic k over the
  top-``match_topk`` IoUs, IDOL's 10);
* **negatives**: every reference-frame query that a second dynamic-k assignment, over the top
  ``neg_topk`` IoUs (IDOL's 100) and the same cost, does *not* give to the instance. So k is
  ⌊Σ top-100 IoUs⌋ — a handful of queries hugging the instance — and the overlapping queries
  beyond it, the hard negatives, stay in; queries assigned to *other* instances are negatives too;
* **aux negatives**: at most ``aux_negatives_per_positive`` (10) × |positives| negatives drawn at
  random (all of them when there are fewer).

Per anchor k with positive / negative embeddings v⁺ / v⁻ (raw dot products, as IDOL):

    contrastive = log(1 + Σ_{v⁺} Σ_{v⁻} exp(k·v⁻ − k·v⁺))
    aux = mean over v ∈ v⁺ ∪ aux v⁻ of (cos(k, v) − [v ∈ v⁺])²

both averaged over the anchors of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .matcher import Match, dynamic_k_assign


@dataclass(eq=False)
class ContrastSample:
    """One anchor's samples: key-frame query, reference-frame positive / negative / aux-negative queries."""

    anchor: int
    positives: torch.Tensor
    negatives: torch.Tensor
    aux_negatives: torch.Tensor


def contrastive_samples(key: Match, ref: Match, key_ids: torch.Tensor, ref_ids: torch.Tensor, *, neg_topk: int,
                        aux_negatives_per_positive: int,
                        generator: torch.Generator | None = None) -> list[ContrastSample]:
    """The samples of every instance present (and matched) in both frames, in reference-GT order."""
    out: list[ContrastSample] = []
    if ref.cost.numel() == 0:
        return out
    num_queries = ref.cost.shape[0]
    wide_q, wide_g = dynamic_k_assign(ref.cost, ref.iou, neg_topk)
    key_row = {int(i): g for g, i in enumerate(key_ids.tolist())}
    for gr, inst in enumerate(ref_ids.tolist()):
        gk = key_row.get(int(inst))
        if gk is None or int(key.primary[gk]) < 0:
            continue
        pos = ref.query_idx[ref.gt_idx == gr]
        if pos.numel() == 0:
            continue
        is_neg = torch.ones(num_queries, dtype=torch.bool, device=ref.cost.device)
        is_neg[wide_q[wide_g == gr]] = False
        neg = is_neg.nonzero().squeeze(1)
        cap = aux_negatives_per_positive * pos.numel()
        aux = neg if neg.numel() <= cap else \
            neg[torch.randperm(neg.numel(), generator=generator, device="cpu")[:cap].to(neg.device)]
        out.append(ContrastSample(int(key.primary[gk]), pos, neg, aux))
    return out


def tracking_losses(anchors: torch.Tensor, positives: list[torch.Tensor], negatives: list[torch.Tensor],
                    aux_negatives: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``anchors`` ``(A, E)``; per anchor positive ``(P_a, E)``, negative ``(N_a, E)`` and aux-negative
    embeddings (None: the negatives) → (contrastive, aux) averaged over the anchors. An anchor without
    negatives adds log(1 + 0) = 0 to the contrastive term."""
    contrast, aux = [], []
    aux_negatives = negatives if aux_negatives is None else aux_negatives
    for k, pos, neg, aux_neg in zip(anchors, positives, negatives, aux_negatives):
        sp, sn = pos @ k, neg @ k
        diffs = (sn[None, :] - sp[:, None]).flatten()
        contrast.append(F.softplus(torch.logsumexp(diffs, 0)) if diffs.numel() else k.sum() * 0.0)
        cand = torch.cat((pos, aux_neg))
        target = torch.cat((torch.ones(pos.shape[0], dtype=k.dtype, device=k.device),
                            torch.zeros(aux_neg.shape[0], dtype=k.dtype, device=k.device)))
        aux.append((F.cosine_similarity(cand, k[None], dim=1) - target).square().mean())
    return torch.stack(contrast).mean(), torch.stack(aux).mean()
