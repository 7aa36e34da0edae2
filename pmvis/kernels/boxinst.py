"""BoxInst losses (docs/design.md §4.1, AdelaiDet defaults): box projection and colour-affinity pairwise.

Pairwise: the reference unfolds (N, 8, H, W) log-probabilities and keeps ~8 such intermediates per
call for autograd. Here each instance's edges are evaluated only inside its box's extent (edges
centred elsewhere have weight 0), all offsets at once, and the backward recomputes them from the
logits: a call's graph keeps its inputs and one (8, H, W) bool mask of similar edges.
Out-of-image neighbours are not edges (weight 0) — ours, stated; in the reference they are
zero-padded and then removed by the unfolded image mask, so the result is the same there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import edge_grads, edge_loss, use_triton


def warmup_factor(step: int, warmup_iters: int) -> float:
    """Linear warm-up of the pairwise / TK terms: min(step / warmup_iters, 1) (BoxInst: 10k)."""
    if warmup_iters <= 0:
        return 1.0
    return min(max(step, 0) / warmup_iters, 1.0)


def _dice(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 - 2.0 * (x * y).sum(-1) / (x.square().sum(-1) + y.square().sum(-1) + eps)


def projection_loss(
    mask_logits: torch.Tensor, box_masks: torch.Tensor, *, reduction: str = "mean", eps: float = 1e-5,
) -> torch.Tensor:
    """Box projection term: dice of the max-projections of sigmoid(mask) and the box mask on y and x.

    ``mask_logits``, ``box_masks``: ``(N, H, W)``. ``reduction="mean"`` averages over instances
    (AdelaiDet), ``"none"`` returns the per-instance ``(N,)`` vector.
    """
    if mask_logits.dim() != 3 or box_masks.shape != mask_logits.shape:
        raise ValueError(f"mask_logits and box_masks must both be (N, H, W), got "
                         f"{tuple(mask_logits.shape)} and {tuple(box_masks.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    scores = mask_logits.sigmoid()
    boxes = box_masks.to(scores.dtype)
    per_instance = (_dice(scores.amax(dim=1), boxes.amax(dim=1), eps)
                    + _dice(scores.amax(dim=2), boxes.amax(dim=2), eps))
    if reduction == "none":
        return per_instance
    return per_instance.mean() if per_instance.numel() else mask_logits.sum() * 0.0


def pairwise_offsets(kernel: int, dilation: int) -> list[tuple[int, int]]:
    """The neighbour offsets dilation·(i, j), row-major, centre excluded (AdelaiDet's unfold order)."""
    half = kernel // 2
    return [(dilation * i, dilation * j) for i in range(-half, half + 1) for j in range(-half, half + 1)
            if (i, j) != (0, 0)]


def _span(offset: int, size: int) -> tuple[slice, slice]:
    """Centre and neighbour slices along one axis for neighbours at ``offset`` inside the image."""
    return slice(max(0, -offset), size - max(0, offset)), slice(max(0, offset), size + min(0, offset))


def _similar_edges(images_lab, valid, offsets, threshold, batch):
    """(O, H, W) — or (N, O, H, W) when the colours or the valid mask are per instance — bool:
    edge (pixel, pixel + offset) is in the image, similar in colour and valid at both ends."""
    h, w = images_lab.shape[-2:]
    per_instance = images_lab.dim() == 4 or (valid is not None and valid.dim() == 3)
    shape = ((batch,) if per_instance else ()) + (len(offsets), h, w)
    out = torch.zeros(shape, dtype=torch.bool, device=images_lab.device)
    for o, (dy, dx) in enumerate(offsets):
        (cy, ny), (cx, nx) = _span(dy, h), _span(dx, w)
        diff = images_lab[..., cy, cx] - images_lab[..., ny, nx]
        ok = torch.exp(-0.5 * diff.square().sum(-3).sqrt()) >= threshold
        if valid is not None:
            ok = ok & valid[..., cy, cx] & valid[..., ny, nx]
        out[..., o, cy, cx] = ok
    return out


def _box_extents(box_masks):
    """Per instance the rows y0:y1 and columns x0:x1 holding its non-zero box pixels, or None."""
    nz = box_masks != 0
    rows, cols = nz.any(2), nz.any(1)
    h, w = rows.shape[1], cols.shape[1]
    first_row, last_row = rows.to(torch.uint8).argmax(1), h - rows.flip(1).to(torch.uint8).argmax(1)
    first_col, last_col = cols.to(torch.uint8).argmax(1), w - cols.flip(1).to(torch.uint8).argmax(1)
    return [(y0, y1, x0, x1) if any_ else None for any_, y0, y1, x0, x1 in zip(
        rows.any(1).tolist(), first_row.tolist(), last_row.tolist(), first_col.tolist(), last_col.tolist())]


def _instance_blocks(padded, similar, box, extents, offsets, margin):
    """Per instance with a box: its box extent's window of ``padded`` (the logits zero-padded by
    ``margin``), the windows of the neighbours at every offset, stacked ``(O, h, w)``, and the edge
    weights there (the similar-edge mask is False where the neighbour is outside the image)."""
    for n, extent in enumerate(extents):
        if extent is None:
            continue
        y0, y1, x0, x1 = extent
        sim = similar[n] if similar.dim() == 4 else similar
        weights = box[n, y0:y1, x0:x1] * sim[:, y0:y1, x0:x1]
        windows = [(n, slice(y0 + margin + dy, y1 + margin + dy), slice(x0 + margin + dx, x1 + margin + dx))
                   for dy, dx in offsets]
        centre = (n, slice(y0 + margin, y1 + margin), slice(x0 + margin, x1 + margin))
        yield centre, windows, torch.stack([padded[w] for w in windows]), weights


class _PairwiseLoss(torch.autograd.Function):
    """Σ edge_loss·w / max(Σ w, 1) over the edges centred in each instance's box extent; the
    backward recomputes the derivatives from the logits, so nothing else is saved."""

    @staticmethod
    def forward(ctx, logits, box, similar, extents, offsets, margin):
        padded = F.pad(logits, (margin,) * 4)
        losses, weights = [], []
        for centre, _, neighbours, w in _instance_blocks(padded, similar, box, extents, offsets, margin):
            losses.append((edge_loss(padded[centre], neighbours) * w).sum())
            weights.append(w.sum())
        if losses:
            num, den = torch.stack(losses).sum(), torch.stack(weights).sum().clamp(min=1.0)
        else:
            num, den = logits.new_zeros(()), logits.new_ones(())
        ctx.save_for_backward(logits, box, similar, den)
        ctx.extents, ctx.offsets, ctx.margin = extents, offsets, margin
        return num / den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, box, similar, den = ctx.saved_tensors
        margin = ctx.margin
        padded = F.pad(logits, (margin,) * 4)
        grad = torch.zeros_like(padded)
        scale = grad_out / den
        for centre, windows, neighbours, w in _instance_blocks(padded, similar, box, ctx.extents,
                                                                ctx.offsets, margin):
            gi, gj = edge_grads(padded[centre], neighbours)
            coef = w * scale
            grad[centre] += (gi * coef).sum(0)
            gj = gj * coef
            for o, window in enumerate(windows):
                grad[window] += gj[o]
        h, w = logits.shape[1:]
        return grad[:, margin:margin + h, margin:margin + w], None, None, None, None, None


def pairwise_loss(
    mask_logits: torch.Tensor,
    images_lab: torch.Tensor,
    box_masks: torch.Tensor,
    *,
    kernel: int = 3,
    dilation: int = 2,
    threshold: float = 0.3,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """BoxInst colour-affinity pairwise loss → scalar Σ loss·w / max(Σ w, 1).

    ``mask_logits``, ``box_masks``: ``(N, H, W)``; ``images_lab``: ``(3, H, W)`` shared by the
    instances or ``(N, 3, H, W)``; ``valid``: ``(H, W)`` or ``(N, H, W)`` bool, False on padding and
    the ignored bottom rows. Edge (i, j = i + offset) weight: [exp(−0.5·‖lab_i − lab_j‖) ≥ threshold]
    · box(i) · valid(i) · valid(j). The warm-up factor is the caller's (:func:`warmup_factor`).
    """
    if mask_logits.dim() != 3 or box_masks.shape != mask_logits.shape:
        raise ValueError(f"mask_logits and box_masks must both be (N, H, W), got "
                         f"{tuple(mask_logits.shape)} and {tuple(box_masks.shape)}")
    n, h, w = mask_logits.shape
    if images_lab.shape not in ((3, h, w), (n, 3, h, w)):
        raise ValueError(f"images_lab must be (3, {h}, {w}) or ({n}, 3, {h}, {w}), got {tuple(images_lab.shape)}")
    if valid is not None:
        if valid.shape not in ((h, w), (n, h, w)):
            raise ValueError(f"valid must be ({h}, {w}) or ({n}, {h}, {w}), got {tuple(valid.shape)}")
        valid = valid.to(torch.bool)
    if kernel < 1 or kernel % 2 == 0 or dilation < 1:
        raise ValueError(f"kernel must be odd and positive and dilation positive, got {kernel}, {dilation}")
    if n == 0:
        return mask_logits.sum() * 0.0
    logits = mask_logits.contiguous()
    if use_triton(backend, logits, images_lab, box_masks):
        from .triton_tk import pairwise_loss_triton

        return pairwise_loss_triton(logits, images_lab, box_masks, kernel=kernel, dilation=dilation,
                                    threshold=threshold, valid=valid)
    offsets = pairwise_offsets(kernel, dilation)
    with torch.no_grad():
        similar = _similar_edges(images_lab, valid, offsets, threshold, n)
        box = box_masks.to(logits.dtype)
        extents = _box_extents(box)
    return _PairwiseLoss.apply(logits, box, similar, extents, offsets, dilation * (kernel // 2))
