"""Fused Triton kernels: TK-Loss evaluation and BoxInst pairwise loss (forward + backward).

Imported lazily by :func:`pmvis.kernels.tk_loss` / :func:`pmvis.kernels.pairwise_loss` for CUDA
tensors, so CPU-only use never imports triton. Under ``TRITON_INTERPRET=1`` (set before this module
is imported) the same kernels run on CPU tensors, which is how the tests check them without a GPU.

* TK-Loss: one program per (block of matches, instance); each match gathers its two logits and the
  instance's box union, so nothing beyond the logits' gradient is written. Backward scatters the two
  partial derivatives with atomics (a candidate can be matched by several pixels).
* Pairwise: one program per (block of pixels, instance); the 8 neighbours, their colour similarity
  and the edge weight are recomputed in registers. Backward gathers, for each pixel, the edges where
  it is the centre and those where it is the neighbour, so it writes each gradient once (no atomics).
Per-program partial sums are reduced by torch: deterministic, no contended atomics on one scalar.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TK_BLOCK = 1024
PAIRWISE_BLOCK = 256


@triton.jit
def _logsigmoid(z):
    return tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _edge_loss(x, y):
    return _logsigmoid(x + y) - _logsigmoid(x) - _logsigmoid(y)


# ----------------------------------------------------------------------------------------- TK-Loss


@triton.jit
def _tk_fwd_kernel(logits_ptr, union_ptr, src_ptr, dst_ptr, pair_ptr, inv_den_ptr, partial_ptr,
                   M, HW, THW, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    src = tl.load(src_ptr + offs, mask=inb, other=0)
    u = tl.load(union_ptr + n * HW + src % HW, mask=inb, other=0.0)
    act = inb & (u != 0.0)
    dst = tl.load(dst_ptr + offs, mask=act, other=0)
    pair = tl.load(pair_ptr + offs, mask=act, other=0)
    xb = tl.load(logits_ptr + n * THW + src, mask=act, other=0.0)
    xa = tl.load(logits_ptr + n * THW + dst, mask=act, other=0.0)
    scale = tl.load(inv_den_ptr + pair, mask=act, other=0.0)
    contrib = tl.where(act, _edge_loss(xb, xa) * u * scale, 0.0)
    tl.store(partial_ptr + n * tl.num_programs(0) + pid, tl.sum(contrib, axis=0))


@triton.jit
def _tk_bwd_kernel(logits_ptr, union_ptr, src_ptr, dst_ptr, pair_ptr, scale_ptr, grad_ptr,
                   M, HW, THW, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    src = tl.load(src_ptr + offs, mask=inb, other=0)
    u = tl.load(union_ptr + n * HW + src % HW, mask=inb, other=0.0)
    act = inb & (u != 0.0)
    dst = tl.load(dst_ptr + offs, mask=act, other=0)
    pair = tl.load(pair_ptr + offs, mask=act, other=0)
    xb = tl.load(logits_ptr + n * THW + src, mask=act, other=0.0)
    xa = tl.load(logits_ptr + n * THW + dst, mask=act, other=0.0)
    coef = u * tl.load(scale_ptr + pair, mask=act, other=0.0)
    both = _sigmoid(-(xb + xa))
    tl.atomic_add(grad_ptr + n * THW + src, (both - _sigmoid(-xb)) * coef, mask=act)
    tl.atomic_add(grad_ptr + n * THW + dst, (both - _sigmoid(-xa)) * coef, mask=act)


class _TKLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, union, src, dst, pair, inv_den):
        n, t, h, w = logits.shape
        m = src.numel()
        grid = (triton.cdiv(m, TK_BLOCK), n)
        partial = torch.empty(n * grid[0], dtype=logits.dtype, device=logits.device)
        _tk_fwd_kernel[grid](logits, union, src, dst, pair, inv_den, partial, m, h * w, t * h * w,
                             BLOCK=TK_BLOCK)
        ctx.save_for_backward(logits, union, src, dst, pair, inv_den)
        return partial.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, union, src, dst, pair, inv_den = ctx.saved_tensors
        n, t, h, w = logits.shape
        m = src.numel()
        grad = torch.zeros_like(logits)
        scale = (inv_den * grad_out).contiguous()
        grid = (triton.cdiv(m, TK_BLOCK), n)
        _tk_bwd_kernel[grid](logits, union, src, dst, pair, scale, grad, m, h * w, t * h * w,
                             BLOCK=TK_BLOCK)
        return grad, None, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def tk_loss_triton(logits: torch.Tensor, union: torch.Tensor, affinity) -> torch.Tensor:
    """TK-Loss from ``logits`` ``(N, T, H, W)``, box union ``(N, H·W)`` and a ``TKAffinity``."""
    dtype = _compute_dtype(logits)
    logits = logits.to(dtype).contiguous()
    union = union.to(dtype).contiguous()
    hw = union.shape[1]
    with torch.no_grad():  # Σ_n U_n(x) per match, summed per pair: the normalisers
        cover = union.sum(0)
        den = torch.zeros(len(affinity.pairs), dtype=dtype, device=logits.device)
        den.index_add_(0, affinity.pair_index, cover[affinity.src % hw])
        inv_den = 1.0 / den.clamp(min=1.0)
    return _TKLossTriton.apply(logits, union, affinity.src.contiguous(), affinity.dst.contiguous(),
                               affinity.pair_index.contiguous(), inv_den)


# ---------------------------------------------------------------------------------------- pairwise


@triton.jit
def _pairwise_fwd_kernel(logits_ptr, lab_ptr, box_ptr, valid_ptr, loss_ptr, weight_ptr,
                         H, W, lab_sn, valid_sn, threshold,
                         KERNEL: tl.constexpr, DILATION: tl.constexpr, HAS_VALID: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    hw = H * W
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    inb = pix < hw
    y = pix // W
    x = pix % W
    box = tl.load(box_ptr + n * hw + pix, mask=inb, other=0.0)
    if HAS_VALID:
        box = tl.where(tl.load(valid_ptr + n * valid_sn + pix, mask=inb, other=0) != 0, box, 0.0)
    act = inb & (box != 0.0)
    lab = lab_ptr + n * lab_sn
    l0 = tl.load(lab + pix, mask=act, other=0.0)
    l1 = tl.load(lab + hw + pix, mask=act, other=0.0)
    l2 = tl.load(lab + 2 * hw + pix, mask=act, other=0.0)
    xi = tl.load(logits_ptr + n * hw + pix, mask=act, other=0.0)
    acc_l = tl.zeros([BLOCK], dtype=xi.dtype)
    acc_w = tl.zeros([BLOCK], dtype=xi.dtype)
    for k in tl.static_range(KERNEL * KERNEL):
        if k != (KERNEL * KERNEL) // 2:
            dy = (k // KERNEL - KERNEL // 2) * DILATION
            dx = (k % KERNEL - KERNEL // 2) * DILATION
            yy = y + dy
            xx = x + dx
            nb = act & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            j = pix + dy * W + dx
            if HAS_VALID:
                nb = nb & (tl.load(valid_ptr + n * valid_sn + j, mask=nb, other=0) != 0)
            d0 = l0 - tl.load(lab + j, mask=nb, other=0.0)
            d1 = l1 - tl.load(lab + hw + j, mask=nb, other=0.0)
            d2 = l2 - tl.load(lab + 2 * hw + j, mask=nb, other=0.0)
            sim = tl.exp(-0.5 * tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2))
            wgt = tl.where(nb & (sim >= threshold), box, 0.0)
            xj = tl.load(logits_ptr + n * hw + j, mask=nb, other=0.0)
            acc_l += tl.where(wgt != 0.0, _edge_loss(xi, xj) * wgt, 0.0)
            acc_w += wgt
    slot = n * tl.num_programs(0) + pid
    tl.store(loss_ptr + slot, tl.sum(acc_l, axis=0))
    tl.store(weight_ptr + slot, tl.sum(acc_w, axis=0))


@triton.jit
def _pairwise_bwd_kernel(logits_ptr, lab_ptr, box_ptr, valid_ptr, scale_ptr, grad_ptr,
                         H, W, lab_sn, valid_sn, threshold,
                         KERNEL: tl.constexpr, DILATION: tl.constexpr, HAS_VALID: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    hw = H * W
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    inb = pix < hw
    y = pix // W
    x = pix % W
    ok = inb
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + n * valid_sn + pix, mask=inb, other=0) != 0)
    box = tl.load(box_ptr + n * hw + pix, mask=ok, other=0.0)
    lab = lab_ptr + n * lab_sn
    l0 = tl.load(lab + pix, mask=ok, other=0.0)
    l1 = tl.load(lab + hw + pix, mask=ok, other=0.0)
    l2 = tl.load(lab + 2 * hw + pix, mask=ok, other=0.0)
    xi = tl.load(logits_ptr + n * hw + pix, mask=ok, other=0.0)
    si = _sigmoid(-xi)
    g = tl.zeros([BLOCK], dtype=xi.dtype)
    for k in tl.static_range(KERNEL * KERNEL):
        if k != (KERNEL * KERNEL) // 2:
            dy = (k // KERNEL - KERNEL // 2) * DILATION
            dx = (k % KERNEL - KERNEL // 2) * DILATION
            yy = y + dy
            xx = x + dx
            nb = ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            j = pix + dy * W + dx
            if HAS_VALID:
                nb = nb & (tl.load(valid_ptr + n * valid_sn + j, mask=nb, other=0) != 0)
            d0 = l0 - tl.load(lab + j, mask=nb, other=0.0)
            d1 = l1 - tl.load(lab + hw + j, mask=nb, other=0.0)
            d2 = l2 - tl.load(lab + 2 * hw + j, mask=nb, other=0.0)
            similar = nb & (tl.exp(-0.5 * tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2)) >= threshold)
            # pixel as the centre of edge (pix, j): weight box(pix); as the neighbour of edge
            # (j, pix) — j is pix − offset' for offset' = −offset, also in the set: weight box(j)
            box_j = tl.load(box_ptr + n * hw + j, mask=similar, other=0.0)
            wgt = tl.where(similar, box + box_j, 0.0)
            xj = tl.load(logits_ptr + n * hw + j, mask=similar, other=0.0)
            g += tl.where(wgt != 0.0, (_sigmoid(-(xi + xj)) - si) * wgt, 0.0)
    scale = tl.load(scale_ptr)
    tl.store(grad_ptr + n * hw + pix, g * scale, mask=inb)


class _PairwiseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, lab, box, valid, lab_sn, valid_sn, threshold, kernel, dilation):
        n, h, w = logits.shape
        grid = (triton.cdiv(h * w, PAIRWISE_BLOCK), n)
        loss = torch.empty(n * grid[0], dtype=logits.dtype, device=logits.device)
        weight = torch.empty_like(loss)
        has_valid = valid is not None
        valid_arg = valid if has_valid else box
        _pairwise_fwd_kernel[grid](logits, lab, box, valid_arg, loss, weight, h, w, lab_sn, valid_sn,
                                   threshold, KERNEL=kernel, DILATION=dilation, HAS_VALID=has_valid,
                                   BLOCK=PAIRWISE_BLOCK)
        den = weight.sum().clamp(min=1.0)
        ctx.save_for_backward(logits, lab, box, valid_arg, den)
        ctx.config = (lab_sn, valid_sn, threshold, kernel, dilation, has_valid)
        return loss.sum() / den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, lab, box, valid_arg, den = ctx.saved_tensors
        lab_sn, valid_sn, threshold, kernel, dilation, has_valid = ctx.config
        n, h, w = logits.shape
        grad = torch.empty_like(logits)
        scale = (grad_out / den).reshape(1).to(logits.dtype).contiguous()
        grid = (triton.cdiv(h * w, PAIRWISE_BLOCK), n)
        _pairwise_bwd_kernel[grid](logits, lab, box, valid_arg, scale, grad, h, w, lab_sn, valid_sn,
                                   threshold, KERNEL=kernel, DILATION=dilation, HAS_VALID=has_valid,
                                   BLOCK=PAIRWISE_BLOCK)
        return grad, None, None, None, None, None, None, None, None


def pairwise_loss_triton(logits, images_lab, box_masks, *, kernel, dilation, threshold, valid=None):
    """Fused pairwise loss; same arguments and result as :func:`pmvis.kernels.pairwise_loss`."""
    dtype = _compute_dtype(logits)
    n, h, w = logits.shape
    logits = logits.to(dtype).contiguous()
    lab = images_lab.to(dtype).contiguous()
    box = box_masks.to(dtype).contiguous()
    lab_sn = 0 if lab.dim() == 3 else 3 * h * w
    valid_sn = 0
    if valid is not None:
        valid_sn = 0 if valid.dim() == 2 else h * w
        valid = valid.to(torch.uint8).contiguous()
    return _PairwiseTriton.apply(logits, lab, box, valid, lab_sn, valid_sn, float(threshold), kernel, dilation)
