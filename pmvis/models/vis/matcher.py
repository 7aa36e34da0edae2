"""SimOTA-style dynamic-k matcher (IDOL, docs/design.md §4.3), run per image and decoder layer.

cost(q, g) = class_cost·focal(q, label_g) + l1_cost·‖box_q − box_g‖₁ + giou_cost·(−GIoU)
             + center_cost·[centre of q not in (box_g ∩ centre region_g)]
             + outside_cost·[centre of q in no GT box and no centre region]
with the focal class cost α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p)) (p = sigmoid of the label's
logit) and the centre region of g the window g_centre ± center_radius / center_stride in each
normalised coordinate (IDOL's ``get_in_boxes_info``: a fixed radius 2.5 / 32, the same for every
GT, so for a GT wider than 2·2.5/32 of the image only queries near its centre are positives;
pmvis before paper parity used ±2.5·(w_g, h_g), which always contains the box).

Assignment: dynamic k_g = clamp(⌊Σ of the top-``topk`` IoUs of g over the queries⌋, 1, Q); g takes
its k_g cheapest queries; a query taken by several GTs keeps the cheapest of them; a GT left
with no query then takes its cheapest free query or, when every query is taken, its cheapest query
among those of GTs that hold two or more (so every GT is matched whenever Q ≥ n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou
from .config import LossConfig


@dataclass(eq=False)
class Match:
    """Matched pairs of one image (sorted by query), the cost and box-IoU matrices ``(Q, n)`` they
    came from, and each GT's primary (cheapest matched) query, −1 for an unmatched GT."""

    query_idx: torch.Tensor
    gt_idx: torch.Tensor
    cost: torch.Tensor
    primary: torch.Tensor
    iou: torch.Tensor | None = None


def _resolve_conflicts(matching: torch.Tensor, cost: torch.Tensor) -> None:
    conflicts = matching.sum(1) > 1
    if conflicts.any():
        rows = conflicts.nonzero().squeeze(1)
        masked = torch.where(matching[rows], cost[rows], torch.full_like(cost[rows], float("inf")))
        best = masked.argmin(1)
        matching[rows] = False
        matching[rows, best] = True


def dynamic_k_assign(cost: torch.Tensor, iou: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-k assignment of ``cost`` / ``iou`` ``(Q, n)`` → ``(query_idx, gt_idx)`` sorted by query."""
    q, n = cost.shape
    empty = torch.zeros(0, dtype=torch.long, device=cost.device)
    if q == 0 or n == 0:
        return empty, empty
    ks = iou.topk(min(topk, q), dim=0).values.sum(0).floor().long().clamp(min=1, max=q)
    matching = torch.zeros(q, n, dtype=torch.bool, device=cost.device)
    for g, k in enumerate(ks.tolist()):
        matching[cost[:, g].topk(k, largest=False).indices, g] = True
    _resolve_conflicts(matching, cost)
    # a GT left without a query takes its cheapest free query, else (all taken) its cheapest query
    # among those of GTs holding two or more — so every GT is matched whenever Q ≥ n
    for g in (~matching.any(0)).nonzero().squeeze(1).tolist():
        taken = matching.any(1)
        owner_count = matching.sum(0)[matching.to(torch.uint8).argmax(1)]
        available = ~taken if not taken.all() else owner_count >= 2
        if not available.any():
            break
        q_best = cost[:, g].masked_fill(~available, float("inf")).argmin()
        matching[q_best] = False
        matching[q_best, g] = True
    query_idx, gt_idx = matching.nonzero(as_tuple=True)
    return query_idx, gt_idx


class DynamicKMatcher:
    """Callable: ``(logits (Q, C), boxes (Q, 4), labels (n,), gt_boxes (n, 4)) -> Match``."""

    def __init__(self, *, class_cost: float, l1_cost: float, giou_cost: float, center_cost: float,
                 outside_cost: float, topk: int, center_radius: float, focal_alpha: float, focal_gamma: float,
                 center_stride: float = 32.0) -> None:
        self.class_cost, self.l1_cost, self.giou_cost = class_cost, l1_cost, giou_cost
        self.center_cost, self.outside_cost = center_cost, outside_cost
        self.topk, self.center_radius, self.center_stride = topk, center_radius, center_stride
        self.alpha, self.gamma = focal_alpha, focal_gamma

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "DynamicKMatcher":
        return cls(class_cost=cfg.match_class_cost, l1_cost=cfg.match_l1_cost, giou_cost=cfg.match_giou_cost,
                   center_cost=cfg.match_center_cost, outside_cost=cfg.match_outside_cost, topk=cfg.match_topk,
                   center_radius=cfg.center_radius, center_stride=cfg.center_stride, focal_alpha=cfg.focal_alpha,
                   focal_gamma=cfg.focal_gamma)

    @torch.no_grad()
    def cost(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
             gt_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cost and IoU matrices ``(Q, n)``."""
        logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
        p = logits.sigmoid()[:, labels]
        pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        neg = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
        pred_xyxy, gt_xyxy = cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt_boxes)
        iou, _ = box_iou(pred_xyxy, gt_xyxy)
        giou = generalized_box_iou(pred_xyxy, gt_xyxy)
        cx, cy = boxes[:, 0:1], boxes[:, 1:2]
        in_box = ((cx > gt_xyxy[:, 0]) & (cx < gt_xyxy[:, 2]) & (cy > gt_xyxy[:, 1]) & (cy < gt_xyxy[:, 3]))
        r = self.center_radius / self.center_stride
        in_centre = ((cx - gt_boxes[:, 0]).abs() < r) & ((cy - gt_boxes[:, 1]).abs() < r)
        foreground = (in_box | in_centre).any(1, keepdim=True)
        cost = (self.class_cost * (pos - neg) + self.giou_cost * -giou
                + self.center_cost * (~(in_box & in_centre)).float() + self.outside_cost * (~foreground).float())
        if self.l1_cost:
            cost = cost + self.l1_cost * torch.cdist(boxes, gt_boxes, p=1)
        return cost, iou

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                 gt_boxes: torch.Tensor) -> Match:
        n = labels.shape[0]
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            none = logits.new_zeros(logits.shape[0], 0)
            return Match(empty, empty, none, empty, none)
        cost, iou = self.cost(logits, boxes, labels, gt_boxes)
        query_idx, gt_idx = dynamic_k_assign(cost, iou, self.topk)
        primary = torch.full((n,), -1, dtype=torch.long, device=logits.device)
        if query_idx.numel():
            pair_cost = cost[query_idx, gt_idx]
            for g in gt_idx.unique().tolist():
                sel = gt_idx == g
                primary[g] = query_idx[sel][pair_cost[sel].argmin()]
        return Match(query_idx, gt_idx, cost, primary, iou)
