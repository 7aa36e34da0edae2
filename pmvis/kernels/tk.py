"""TK-Loss (MaskFreeVIS, docs/design.md §4.2): temporal KNN-patch matches once per clip, loss per layer.

The matches depend only on the images, so :func:`tk_affinity` finds them once per clip (no
gradients) and stores just the kept matches — O(pairs·K·H·W) — and :func:`tk_loss` evaluates the
loss from them for each decoder layer, gathering the two logits of every match. Nothing of size
(pairs × N × window² × H × W) is ever built; the torch path works on instance chunks and recomputes
in the backward what it needs, so a layer's graph keeps only its inputs.

Choices the papers leave open (ours):

* Out-of-frame candidates are never matches: they rank after every in-frame candidate (as if
  s = −∞), so they cannot displace one, and a kept slot they fill has weight 0. (The reference's
  zero-padded unfold lets such a candidate count in the normaliser with a loss of 0.) Patch
  descriptors themselves are zero padded, as in the reference.
* Ties in similarity keep the lowest candidate index first; candidates are numbered row-major over
  the window offsets (i, j), i, j ∈ −⌊w/2⌋..⌊w/2⌋ (i the row offset).
* One normaliser per pair: Σ loss·w / max(Σ w, 1) with the sums over instances, pixels and kept
  candidates together; TK-Loss = Σ over pairs. Box masks may be soft: U = max over frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import edge_grads, edge_loss, use_triton

# gathered (instance, match) entries per chunk when chunk_size is not given: bounds the transient
# memory of one chunk to a few tens of MB whatever N, T and H×W are
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True, eq=False)
class TKAffinity:
    """The kept matches of one clip, reusable by every decoder layer's :func:`tk_loss`.

    ``candidates`` / ``matches``: ``(pairs, K, H, W)``, the window index (row-major, best first) of
    each kept candidate of each pixel of frame b, and whether it is a match (s ≥ threshold).
    ``src`` / ``dst`` / ``pair_index``: ``(M,)`` the matches compacted — flat index ``b·H·W + x`` of
    the pixel, ``a·H·W + y`` of its matched candidate, and the pair it belongs to.
    """

    pairs: tuple[tuple[int, int], ...]
    frames: int
    height: int
    width: int
    patch_size: int
    window: int
    dilation: int
    k: int
    threshold: float
    candidates: torch.Tensor
    matches: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    pair_index: torch.Tensor

    @property
    def num_matches(self) -> int:
        return int(self.src.numel())

    def pair_affinity(self, p: int) -> "TKAffinity":
        """The matches of pair ``p`` = (a, b) alone, as the affinity of the 2-frame clip (a, b):
        ``frames=2``, ``pairs=((0, 1),)``, frame a renumbered 0 and frame b 1 in ``src`` / ``dst``.

        It equals :func:`tk_affinity` of ``images_lab[[a, b]]`` with ``pairs=[(0, 1)]``, so
        :func:`tk_loss` can evaluate one pair on ``(N, 2, H, W)`` logits (frame a, frame b) — for a
        subset of instances per pair — with the fused kernels unchanged.
        """
        if not 0 <= p < len(self.pairs):
            raise IndexError(f"pair {p} out of range for {len(self.pairs)} pairs")
        a, b = self.pairs[p]
        hw = self.height * self.width
        keep = self.pair_index == p
        src, dst = self.src[keep], self.dst[keep]
        return TKAffinity(
            pairs=((0, 1),), frames=2, height=self.height, width=self.width, patch_size=self.patch_size,
            window=self.window, dilation=self.dilation, k=self.k, threshold=self.threshold,
            candidates=self.candidates[p:p + 1], matches=self.matches[p:p + 1],
            src=src - (b - 1) * hw, dst=dst - a * hw, pair_index=torch.zeros_like(self.pair_index[keep]),
        )


def default_pairs(frames: int, cyclic: bool = False) -> tuple[tuple[int, int], ...]:
    """Every (a, b) with a < b; or the cycle (0,1), (1,2), …, (T−1, 0) (MaskFreeVIS's 5-frame variant)."""
    if cyclic:
        return tuple((t, (t + 1) % frames) for t in range(frames))
    return tuple((a, b) for a in range(frames) for b in range(a + 1, frames))


def _check_odd(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {value!r}")


@torch.no_grad()
def tk_affinity(
    images_lab: torch.Tensor,
    *,
    pairs: list[tuple[int, int]] | None = None,
    cyclic: bool = False,
    patch_size: int = 3,
    window: int = 3,
    dilation: int = 3,
    k: int = 5,
    threshold: float = 0.05,
) -> TKAffinity:
    """Find the TK-Loss matches of a clip, ``images_lab``: ``(T, 3, H, W)`` LAB frames at mask size.

    For each pair (a, b) and pixel x of frame b: the P×P zero-padded LAB patch descriptor is
    compared with those of the window² candidates x + dilation·(i, j) of frame a,
    s = exp(−0.5·‖Δ‖₂); the top ``k`` are kept and those with s ≥ ``threshold`` are matches.
    Defaults are MaskFreeVIS's.
    """
    if images_lab.dim() != 4 or images_lab.shape[1] != 3:
        raise ValueError(f"images_lab must be (T, 3, H, W), got {tuple(images_lab.shape)}")
    frames, _, height, width = images_lab.shape
    if frames < 2:
        raise ValueError(f"TK-Loss needs at least 2 frames, got {frames}")
    _check_odd("patch_size", patch_size)
    _check_odd("window", window)
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")
    if not 1 <= k <= window * window:
        raise ValueError(f"k must be in 1..window² = {window * window}, got {k}")
    pairs = default_pairs(frames, cyclic) if pairs is None else tuple((int(a), int(b)) for a, b in pairs)
    if not pairs:
        raise ValueError("pairs is empty")
    for a, b in pairs:
        if not (0 <= a < frames and 0 <= b < frames) or a == b:
            raise ValueError(f"bad frame pair {(a, b)} for T={frames}")

    device = images_lab.device
    lab = images_lab if images_lab.is_floating_point() else images_lab.float()
    r, half, d = patch_size // 2, window // 2, dilation
    pad = r + half * d
    padded = F.pad(lab, (pad, pad, pad, pad))
    a_idx = torch.tensor([a for a, _ in pairs], device=device)
    b_idx = torch.tensor([b for _, b in pairs], device=device)
    hr, wr = height + 2 * r, width + 2 * r  # the frame plus the patch margin
    frame_b = padded[b_idx, :, pad - r:pad - r + hr, pad - r:pad - r + wr]
    offsets = [(i, j) for i in range(-half, half + 1) for j in range(-half, half + 1)]
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    sims = torch.empty(len(pairs), len(offsets), height, width, dtype=lab.dtype, device=device)
    for c, (i, j) in enumerate(offsets):
        y0, x0 = pad - r + d * i, pad - r + d * j
        sq = (frame_b - padded[a_idx, :, y0:y0 + hr, x0:x0 + wr]).square().sum(1)  # (pairs, hr, wr)
        # Σ over the P×P patch: separable box sum (rows, then columns)
        sq = sum(sq[:, oy:oy + height] for oy in range(patch_size))
        dist2 = sum(sq[:, :, ox:ox + width] for ox in range(patch_size))
        inside = (((rows + d * i) >= 0) & ((rows + d * i) < height))[:, None] & \
                 (((cols + d * j) >= 0) & ((cols + d * j) < width))[None, :]
        sims[:, c] = torch.where(inside, torch.exp(-0.5 * dist2.sqrt()), -1.0)
    # stable sort: equal similarities keep the lower candidate index first
    values, order = torch.sort(sims, dim=1, descending=True, stable=True)
    candidates = order[:, :k]
    matches = values[:, :k] >= threshold
    p, _, yy, xx = matches.nonzero(as_tuple=True)
    c = candidates[matches]
    dy = d * (torch.div(c, window, rounding_mode="floor") - half)
    dx = d * (c % window - half)
    hw = height * width
    src = b_idx[p] * hw + yy * width + xx
    dst = a_idx[p] * hw + (yy + dy) * width + (xx + dx)
    return TKAffinity(
        pairs=pairs, frames=frames, height=height, width=width, patch_size=patch_size,
        window=window, dilation=dilation, k=k, threshold=float(threshold),
        candidates=candidates.to(torch.int16), matches=matches, src=src, dst=dst, pair_index=p,
    )


def _chunk(chunk_size: int | None, n: int, m: int) -> int:
    if chunk_size is None:
        return max(1, min(n, CHUNK_ELEMENTS // max(m, 1)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    return chunk_size


def _active(union: torch.Tensor, src_pixel: torch.Tensor, n0: int, n1: int):
    """The (instance, match) entries of instances n0:n1 with non-zero weight U(x)."""
    u = union[n0:n1].index_select(1, src_pixel).view(-1)  # (chunk·M,)
    entries = u.nonzero().squeeze(1)
    m = src_pixel.numel()
    return torch.div(entries, m, rounding_mode="floor") + n0, entries % m, u.index_select(0, entries)


class _TKLoss(torch.autograd.Function):
    """Σ_pairs Σ edge_loss·U / max(Σ U, 1) over the matches; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, logits, union, src, dst, pair_index, num_pairs, chunk):
        n, total = logits.shape[0], logits[0].numel()
        hw = union.shape[1]
        flat = logits.reshape(-1)
        src_pixel = src % hw
        num = torch.zeros(num_pairs, dtype=logits.dtype, device=logits.device)
        den = torch.zeros_like(num)
        for n0 in range(0, n, chunk):
            inst, match, w = _active(union, src_pixel, n0, min(n, n0 + chunk))
            base = inst * total
            xb = flat.index_select(0, base + src[match])
            xa = flat.index_select(0, base + dst[match])
            pair = pair_index[match]
            num.index_add_(0, pair, edge_loss(xb, xa) * w)
            den.index_add_(0, pair, w)
        den = den.clamp(min=1.0)
        ctx.save_for_backward(logits, union, src, dst, pair_index, den)
        ctx.chunk = chunk
        return (num / den).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, union, src, dst, pair_index, den = ctx.saved_tensors
        n, total = logits.shape[0], logits[0].numel()
        flat = logits.reshape(-1)
        src_pixel = src % union.shape[1]
        scale = grad_out / den
        grad = torch.zeros_like(flat)
        for n0 in range(0, n, ctx.chunk):
            inst, match, w = _active(union, src_pixel, n0, min(n, n0 + ctx.chunk))
            base = inst * total
            ib, ia = base + src[match], base + dst[match]
            gb, ga = edge_grads(flat.index_select(0, ib), flat.index_select(0, ia))
            coef = w * scale[pair_index[match]]
            grad.index_add_(0, ib, gb * coef)
            grad.index_add_(0, ia, ga * coef)
        return grad.view_as(logits), None, None, None, None, None, None


def tk_loss(
    mask_logits: torch.Tensor,
    box_masks: torch.Tensor,
    affinity: TKAffinity,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """TK-Loss of one layer's ``mask_logits`` ``(N, T, H, W)`` from a clip's :class:`TKAffinity`.

    ``box_masks`` ``(N, T, H, W)``: each instance's box masks; a match of pixel x counts with weight
    U(x), the union of the instance's boxes over the clip. Differentiable in ``mask_logits``.
    ``chunk_size`` instances are evaluated at a time (default: bounded by ``CHUNK_ELEMENTS``).
    ``backend``: ``auto`` (Triton on CUDA tensors, torch otherwise), ``torch`` or ``triton``.
    """
    shape = (affinity.frames, affinity.height, affinity.width)
    if mask_logits.dim() != 4 or tuple(mask_logits.shape[1:]) != shape:
        raise ValueError(f"mask_logits must be (N, {', '.join(map(str, shape))}), got {tuple(mask_logits.shape)}")
    if box_masks.shape != mask_logits.shape:
        raise ValueError(f"box_masks {tuple(box_masks.shape)} must match mask_logits {tuple(mask_logits.shape)}")
    n = mask_logits.shape[0]
    if n == 0 or affinity.num_matches == 0:
        return mask_logits.sum() * 0.0
    union = box_masks.amax(dim=1).reshape(n, -1).to(mask_logits.dtype)
    logits = mask_logits.contiguous()
    if use_triton(backend, logits, affinity.src):
        from .triton_tk import tk_loss_triton

        return tk_loss_triton(logits, union, affinity)
    chunk = _chunk(chunk_size, n, affinity.num_matches)
    return _TKLoss.apply(logits, union, affinity.src, affinity.dst, affinity.pair_index,
                         len(affinity.pairs), chunk)
