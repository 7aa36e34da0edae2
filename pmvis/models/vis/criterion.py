"""The training losses of IDOL / IDOL-BoxInst / PM-VIS (+ TK-Loss) for a batch of clips.

``VISCriterion(cfg)(output, targets, mask_logits_fn, iteration=i)`` with ``targets[b][t]`` the
:class:`FrameTargets` of frame t of clip b (the model's batch is the B·T images clip-major) and
``mask_logits_fn`` the model's :meth:`IDOL.mask_logits`. It returns unweighted terms — the last
decoder layer's as ``class``, ``l1``, ``giou``, mask terms, ``tk``; layer l < L−1's with a ``_l``
suffix; ``track`` / ``track_aux`` once — and their weighted sum (warm-ups applied) as ``loss``.

Per decoder layer, each supervised image is matched on its own (dynamic-k, :mod:`.matcher`):
* ``class``: sigmoid focal over all queries × classes, summed and divided by the number of
  matched pairs M of the supervised images (≥ 1); ``l1``, ``giou``: Σ over pairs / M.
* Mask terms on the matched pairs' mask logits (N, H/4, W/4), by ``mode``: ``boxinst``:
  ``proj`` (mean over pairs) + ``pairwise`` (warmed up); ``pmvis``: boxinst + ``pseudo_focal`` /
  ``pseudo_dice`` over the pairs whose GT has a pseudo mask (weight > 0), optionally × the
  quality or ÷ it (the PM-VIS authors' ÷ SAM IoU; the weights come with the targets); ``full``: ``mask_focal`` / ``mask_dice`` against the GT masks. Focal/dice
  normalisation is :func:`pmvis.kernels.pseudo_mask_loss`'s.
* ``tk`` (when enabled): per clip the matches are found once (:func:`tk_affinity`, no grad) and
  split by frame pair (:meth:`TKAffinity.pair_affinity`). IDOL's queries are per frame, so an
  instance has a prediction only in the frames where it is present and matched: each layer's loss
  of a clip is Σ over its pairs (a, b) of :func:`tk_loss` on the instances present and matched in
  both a and b, with the logits of frame a from the instance's primary (cheapest matched) query in
  a and those of frame b from its primary query in b; an (instance, pair) with the instance
  absent or unmatched in a or b is left out. The weight U of an instance stays the union of its
  box masks over all the clip's frames (MaskFreeVIS). Each pair's term is normalised over its own
  instances (Σ loss·w / max(Σ w, 1)), so with every instance present everywhere this is the
  TK-Loss of the clip's (N, T) logits. Averaged over the clips that have at least one such
  (instance, pair). Warmed up over ``tk_warmup_calls`` loss calls counted as MaskFreeVIS counts
  them, one per decoder layer and iteration (:meth:`VISCriterion.tk_warmup_call`).
* ``track`` / ``track_aux``: last layer only, key frame t=0 vs reference frame t=1, IDOL's sample
  selection (:mod:`.tracking_loss`: one anchor per instance, dynamic-k negatives, ≤ 10 aux
  negatives per positive); needs T ≥ 2, else not computed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pmvis.kernels import (
    TKAffinity,
    pairwise_loss,
    projection_loss,
    pseudo_mask_loss,
    tk_affinity,
    tk_loss,
    warmup_factor,
)
from pmvis.kernels.pseudo import sigmoid_focal_loss

from .boxes import cxcywh_to_xyxy, paired_generalized_box_iou
from .config import LossConfig
from .idol import MaskLogitsFn, VISOutput
from .matcher import DynamicKMatcher, Match
from .targets import FrameTargets
from .tracking_loss import contrastive_samples, tracking_losses


class VISCriterion(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.matcher = DynamicKMatcher.from_config(cfg)

    @staticmethod
    def tk_warmup_call(iteration: int, layer: int, num_layers: int) -> int:
        """The TK warm-up counter (1-based) of decoder layer ``layer`` of ``num_layers`` at the 0-based
        training ``iteration``, as MaskFreeVIS counts it.

        MaskFreeVIS (``mask2former_video/modeling/criterion.py``, ``VideoSetCriterion``) increments a
        buffer ``_iter`` by 1 at the start of every ``loss_masks_proj`` call and multiplies the TK
        terms of that call by min(_iter / 2000, 1). Its ``forward`` calls it once per decoder
        prediction per iteration: first for the last layer, then for the auxiliary layers in order.
        So with L layers the call is i·L + 1 for the last layer of iteration i and i·L + l + 2 for
        layer l < L − 1.
        """
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer must be in 0..{num_layers - 1}, got {layer}")
        return max(iteration, 0) * num_layers + (1 if layer == num_layers - 1 else layer + 2)

    def weight(self, term: str, iteration: int, *, layer: int | None = None, num_layers: int | None = None) -> float:
        """The weight of a term (layer suffix removed) at 0-based ``iteration``, warm-ups included.

        ``pairwise``: × min(iteration / pairwise_warmup_iters, 1) (BoxInst). ``tk``: ×
        min(c / tk_warmup_calls, 1) with c = :meth:`tk_warmup_call` (``iteration``, ``layer``,
        ``num_layers``) — MaskFreeVIS's count of loss calls; ``layer`` and ``num_layers`` are needed.
        """
        c = self.cfg
        if term == "tk":
            if layer is None or num_layers is None:
                raise ValueError("the TK warm-up counts loss calls per decoder layer: give layer and num_layers")
            return c.tk_weight * warmup_factor(self.tk_warmup_call(iteration, layer, num_layers), c.tk_warmup_calls)
        weights = {
            "class": c.class_weight, "l1": c.l1_weight, "giou": c.giou_weight, "proj": c.projection_weight,
            "pairwise": c.pairwise_weight * warmup_factor(iteration, c.pairwise_warmup_iters),
            "pseudo_focal": c.pseudo_focal_weight, "pseudo_dice": c.pseudo_dice_weight,
            "mask_focal": c.mask_focal_weight, "mask_dice": c.mask_dice_weight,
            "track": c.track_weight, "track_aux": c.track_aux_weight,
        }
        return weights[term]

    def forward(self, output: VISOutput, targets: Sequence[Sequence[FrameTargets]], mask_logits_fn: MaskLogitsFn,
                *, iteration: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        clips = [list(c) for c in targets]
        if not clips or any(len(c) != len(clips[0]) for c in clips) or not clips[0]:
            raise ValueError("targets must be B ≥ 1 clips of the same number T ≥ 1 of frames")
        b_clips, frames = len(clips), len(clips[0])
        flat = [f for c in clips for f in c]
        if output.logits.shape[1] != len(flat):
            raise ValueError(f"the model saw {output.logits.shape[1]} images, targets describe "
                             f"{b_clips} clips × {frames} frames")
        for i, f in enumerate(flat):
            if f.mask_size != output.mask_size:
                raise ValueError(f"targets of image {i} are at {f.mask_size}, the masks at {output.mask_size}")
        if cfg.tk and frames < 2:
            raise ValueError("TK-Loss needs clips of at least 2 frames")
        num_classes = output.logits.shape[-1]
        for i, f in enumerate(flat):
            if f.num_instances and not 0 <= int(f.labels.min()) <= int(f.labels.max()) < num_classes:
                raise ValueError(f"labels of image {i} must be in 0..{num_classes - 1}, got {f.labels.tolist()}")
        sup_frames = [0] if cfg.loss_frames == "key" else list(range(frames))
        track = frames >= 2 and (cfg.track_weight != 0 or cfg.track_aux_weight != 0)
        # per layer: matched images of the supervised frames (+ every frame for TK, + the key and
        # reference frames at the last layer for tracking), each matched once
        per_layer = set(sup_frames) | (set(range(frames)) if cfg.tk else set())
        layers = output.num_layers
        matches: list[dict[int, Match]] = []
        for lid in range(layers):
            wanted = per_layer | ({0, 1} if track and lid == layers - 1 else set())
            matches.append({b * frames + t: self.matcher(output.logits[lid, b * frames + t].detach(),
                                                         output.boxes[lid, b * frames + t].detach(),
                                                         flat[b * frames + t].labels, flat[b * frames + t].boxes)
                            for b in range(b_clips) for t in sorted(wanted)})
        supervised = [b * frames + t for b in range(b_clips) for t in sup_frames]
        affinities = pair_affinities = None
        if cfg.tk:
            affinities = [tk_affinity(torch.stack([f.images_lab for f in clip]), cyclic=cfg.tk_cyclic,
                                      patch_size=cfg.tk_patch_size, window=cfg.tk_window, dilation=cfg.tk_dilation,
                                      k=cfg.tk_k, threshold=cfg.tk_threshold) for clip in clips]
            pair_affinities = [[aff.pair_affinity(p) for p in range(len(aff.pairs))] for aff in affinities]
        terms: dict[str, torch.Tensor] = {}
        total = output.logits.sum() * 0.0
        for lid in range(layers):
            suffix = "" if lid == layers - 1 else f"_{lid}"
            layer_terms = self._frame_losses(output, lid, supervised, flat, matches[lid], mask_logits_fn)
            if affinities is not None:
                layer_terms["tk"] = self._tk(output, lid, clips, matches[lid], affinities, pair_affinities,
                                             mask_logits_fn)
            for name, value in layer_terms.items():
                terms[name + suffix] = value
                total = total + self.weight(name, iteration, layer=lid, num_layers=layers) * value
        if track:
            terms["track"], terms["track_aux"] = self._track(output, clips, matches[-1], iteration)
            total = total + self.weight("track", iteration) * terms["track"] \
                + self.weight("track_aux", iteration) * terms["track_aux"]
        terms["loss"] = total
        return terms

    def _frame_losses(self, output: VISOutput, lid: int, images: list[int], flat: list[FrameTargets],
                      matches: dict[int, Match], mask_logits_fn: MaskLogitsFn) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        logits = output.logits[lid]
        zero = logits.sum() * 0.0
        num_pos = sum(matches[i].query_idx.numel() for i in images)
        denom = max(num_pos, 1)
        cls = zero
        for i in images:
            m, f = matches[i], flat[i]
            onehot = torch.zeros_like(logits[i])
            onehot[m.query_idx, f.labels[m.gt_idx]] = 1.0
            cls = cls + sigmoid_focal_loss(logits[i], onehot, cfg.focal_alpha, cfg.focal_gamma).sum()
        out = {"class": cls / denom}
        mode_terms = {"boxinst": ("proj", "pairwise"), "pmvis": ("proj", "pairwise", "pseudo_focal", "pseudo_dice"),
                      "full": ("mask_focal", "mask_dice")}[cfg.mode]
        if num_pos == 0:
            out.update({name: zero for name in ("l1", "giou") + mode_terms})
            return out
        batch_idx = torch.cat([torch.full_like(matches[i].query_idx, i) for i in images])
        query_idx = torch.cat([matches[i].query_idx for i in images])

        def gather(field: str) -> torch.Tensor:
            return torch.cat([getattr(flat[i], field)[matches[i].gt_idx] for i in images])

        pred = output.boxes[lid, batch_idx, query_idx]
        gt = gather("boxes").to(pred.dtype)
        out["l1"] = (pred - gt).abs().sum() / denom
        out["giou"] = (1 - paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt))).sum() / denom
        masks = mask_logits_fn(output, lid, batch_idx, query_idx)
        if cfg.mode in ("boxinst", "pmvis"):
            box_masks = gather("box_masks")
            per_pair = torch.cat([torch.full_like(matches[i].query_idx, k) for k, i in enumerate(images)])
            lab = torch.stack([flat[i].images_lab for i in images])[per_pair]
            valid = torch.stack([flat[i].valid for i in images])[per_pair]
            out["proj"] = projection_loss(masks, box_masks)
            out["pairwise"] = pairwise_loss(masks, lab, box_masks, kernel=cfg.pairwise_size,
                                            dilation=cfg.pairwise_dilation, threshold=cfg.pairwise_threshold,
                                            valid=valid)
        if cfg.mode == "pmvis":
            out["pseudo_focal"], out["pseudo_dice"] = self._pseudo(masks, images, flat, matches, zero)
        if cfg.mode == "full":
            if any(flat[i].gt_masks is None for i in images):
                raise ValueError("mode 'full' needs gt_masks in the FrameTargets of every supervised frame")
            terms = pseudo_mask_loss(masks, gather("gt_masks"), focal_alpha=cfg.focal_alpha,
                                     focal_gamma=cfg.focal_gamma, focal_weight=1.0, dice_weight=1.0, return_terms=True)
            out["mask_focal"], out["mask_dice"] = terms["focal"], terms["dice"]
        return out

    def _pseudo(self, masks, images, flat, matches, zero):
        """Pseudo-mask focal / dice over the matched pairs whose GT has a pseudo mask."""
        cfg = self.cfg
        rows, targets, weights = [], [], []
        start = 0
        for i in images:
            m, f = matches[i], flat[i]
            count = m.query_idx.numel()
            if f.pseudo_masks is not None and count:
                w = (f.pseudo_weights if f.pseudo_weights is not None
                     else torch.ones(f.num_instances, device=masks.device))[m.gt_idx].to(masks.dtype)
                keep = (w > 0).nonzero().squeeze(1)
                rows.append(keep + start)
                targets.append(f.pseudo_masks[m.gt_idx[keep]])
                weights.append(w[keep])
            start += count
        if not rows or sum(r.numel() for r in rows) == 0:
            return zero, zero
        weights_t = torch.cat(weights)
        terms = pseudo_mask_loss(masks[torch.cat(rows)], torch.cat(targets),
                                 weights=weights_t if (cfg.pseudo_quality_weighting
                                                       or cfg.pseudo_divide_by_quality) else None,
                                 focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
                                 focal_weight=1.0, dice_weight=1.0, return_terms=True)
        return terms["focal"], terms["dice"]

    def _tk(self, output: VISOutput, lid: int, clips: list[list[FrameTargets]], matches: dict[int, Match],
            affinities: list[TKAffinity], pair_affinities: list[list[TKAffinity]],
            mask_logits_fn: MaskLogitsFn) -> torch.Tensor:
        """TK-Loss of layer ``lid``: per clip, Σ over its pairs p = (a, b) of :func:`tk_loss` on the
        instances present and matched in both a and b (``pair_affinities[b][p]``: the pair's 2-frame
        affinity, :meth:`TKAffinity.pair_affinity`), averaged over the clips with at least one such
        (instance, pair)."""
        frames = len(clips[0])
        size = output.mask_size
        dev = output.mask_features.device
        losses = []
        for b, clip in enumerate(clips):
            # per frame: instance id → (GT row, primary query in this frame, −1 when unmatched)
            present = [{int(u): (g, int(matches[b * frames + t].primary[g]))
                        for g, u in enumerate(f.instance_ids.tolist())} for t, f in enumerate(clip)]

            def matched(t: int, u: int) -> bool:
                return present[t].get(u, (None, -1))[1] >= 0

            per_pair = []  # (p, a, b, instance ids present and matched in frames a and b)
            for p, (a, c) in enumerate(affinities[b].pairs):
                both = [u for u in sorted(present[a]) if matched(a, u) and matched(c, u)]
                if both:
                    per_pair.append((p, a, c, both))
            if not per_pair:
                continue
            # one mask-logit row per (frame, instance) used by some pair, from that frame's own query
            rows: dict[tuple[int, int], int] = {}
            for _, a, c, both in per_pair:
                for key in [(a, u) for u in both] + [(c, u) for u in both]:
                    rows.setdefault(key, len(rows))
            batch_idx = torch.tensor([b * frames + t for t, _ in rows], device=dev)
            query_idx = torch.tensor([present[t][u][1] for t, u in rows], device=dev)
            logits = mask_logits_fn(output, lid, batch_idx, query_idx)
            # U: the union over the clip's frames of each instance's box masks (zero where absent)
            union: dict[int, torch.Tensor] = {}
            for t, frame in enumerate(present):
                for u, (g, _) in frame.items():
                    box = clip[t].box_masks[g]
                    union[u] = box if u not in union else torch.maximum(union[u], box)
            total = None
            for p, a, c, both in per_pair:
                pair_logits = torch.stack([logits[[rows[a, u] for u in both]], logits[[rows[c, u] for u in both]]], 1)
                u_masks = torch.stack([union[u] for u in both]).to(logits.dtype)[:, None].expand(-1, 2, *size)
                term = tk_loss(pair_logits, u_masks, pair_affinities[b][p])
                total = term if total is None else total + term
            losses.append(total)
        if not losses:
            return output.mask_params[lid].sum() * 0.0
        return torch.stack(losses).mean()

    def _track(self, output, clips, matches, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        frames = len(clips[0])
        # the aux negatives are drawn at random (IDOL: random.sample): seeded by the iteration, so a
        # step's loss is a function of its inputs (resume and re-evaluation give the same value)
        generator = torch.Generator().manual_seed(max(int(iteration), 0))
        emb = output.embeddings
        anchors, positives, negatives, aux_negatives = [], [], [], []
        for b, clip in enumerate(clips):
            key, ref = b * frames, b * frames + 1
            for sample in contrastive_samples(matches[key], matches[ref], clip[0].instance_ids, clip[1].instance_ids,
                                              neg_topk=self.cfg.track_neg_topk,
                                              aux_negatives_per_positive=self.cfg.track_aux_negatives,
                                              generator=generator):
                anchors.append(emb[key, sample.anchor])
                positives.append(emb[ref, sample.positives])
                negatives.append(emb[ref, sample.negatives])
                aux_negatives.append(emb[ref, sample.aux_negatives])
        if not anchors:
            zero = emb.sum() * 0.0
            return zero, zero
        return tracking_losses(torch.stack(anchors), positives, negatives, aux_negatives)
