"""Benchmark: TK-Loss and BoxInst pairwise loss, ours vs the unfold formulations of the references.

One training iteration's mask terms: L decoder layers, N instances, a T-frame clip at mask
resolution H×W (stride 4 of the frames). Forward + backward time and peak memory of:

* TK-Loss — ours: ``tk_affinity`` once per clip + ``tk_loss`` per layer. Baseline (written below the
  way MaskFreeVIS does it): per layer and frame pair, materialise the (1, 3P², H, W) patch unfolds and
  the (1, 3P², w², H, W) window unfold, recompute the similarities and the top-K, and evaluate the
  loss on (N, w², H, W) unfolded log-probabilities kept for autograd.
* Pairwise — ours: ``pairwise_loss`` per layer. Baseline (AdelaiDet): colour similarity by unfold once
  per image, then per layer the (N, 8, H, W) unfolded log-probabilities kept for autograd.

Both formulations are first run in float64 on the same inputs and must give the same losses and
gradients (so the comparison is of equal work); timings and memory are then taken in float32.
Each variant runs in a fresh subprocess. Peak memory on CPU: the process's resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs after a warm-up run) minus its resident set before
the measured iteration, with glibc told to serve allocations ≥ 64 KiB by mmap so that freed tensors
leave the resident set (a separate process from the timing runs, which keep glibc's defaults); on
CUDA: ``torch.cuda.max_memory_allocated`` over the iteration. Time: best of ``--repeats``.

    uv run python benchmarks/kernels.py                 # CPU, the sizes of the issue
    uv run python benchmarks/kernels.py --device cuda   # GPU (fused Triton path)
    uv run python benchmarks/kernels.py --size 24 32 --layers 2 --instances 3 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmvis.kernels import pairwise_loss, rgb_to_lab, tk_affinity, tk_loss  # noqa: E402
from pmvis.kernels.tk import default_pairs  # noqa: E402

TK = dict(patch_size=3, window=3, dilation=3, k=5, threshold=0.05)  # MaskFreeVIS
PAIRWISE = dict(kernel=3, dilation=2, threshold=0.3)  # AdelaiDet BoxInst
VARIANTS = ("tk_unfold", "tk_ours", "pairwise_unfold", "pairwise_ours")


# ------------------------------------------------------------------------------------- inputs


def make_inputs(layers: int, instances: int, frames: int, height: int, width: int, dtype, device, seed=0):
    """A synthetic clip (textured moving ellipses on a smooth background, camera noise) at 4×H×4W,
    pooled by 4 to mask resolution and converted to LAB; box masks per instance and frame; L layers
    of random mask logits."""
    g = torch.Generator().manual_seed(seed)
    big_h, big_w = 4 * height, 4 * width
    yy, xx = torch.meshgrid(torch.arange(big_h, dtype=torch.float64), torch.arange(big_w, dtype=torch.float64),
                            indexing="ij")
    phase = torch.rand(3, generator=g) * 6.28
    background = torch.stack([110 + 60 * torch.sin(xx / (60 + 20 * c) + phase[c]) * torch.cos(yy / 90)
                              for c in range(3)])
    clip = background.expand(frames, 3, big_h, big_w).clone()
    boxes = torch.zeros(instances, frames, height, width, dtype=torch.float64)
    for i in range(instances):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([big_h, big_w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * torch.tensor([big_h, big_w]) * 0.2 + 12).tolist()
        vy, vx = (torch.randn(2, generator=g) * 8).tolist()
        colour = torch.rand(3, 1, 1, generator=g, dtype=torch.float64) * 255
        period = 6 + 20 * torch.rand(1, generator=g).item()
        for t in range(frames):
            oy, ox = cy + vy * t, cx + vx * t
            inside = ((yy - oy) / ry) ** 2 + ((xx - ox) / rx) ** 2 <= 1
            texture = colour + 25 * torch.sin((xx + yy) / period)
            clip[t] = torch.where(inside, texture, clip[t])
            y0, y1 = max(0, int((oy - ry) / 4)), min(height, int((oy + ry) / 4) + 1)
            x0, x1 = max(0, int((ox - rx) / 4)), min(width, int((ox + rx) / 4) + 1)
            if y0 < y1 and x0 < x1:
                boxes[i, t, y0:y1, x0:x1] = 1
    clip = (clip + torch.randn(clip.shape, generator=g, dtype=torch.float64) * 3).clamp(0, 255)
    lab = rgb_to_lab(F.avg_pool2d(clip, 4))
    logits = torch.randn(layers, instances, frames, height, width, generator=g, dtype=torch.float64) * 2
    to = dict(dtype=dtype, device=device)
    return lab.to(**to), boxes.to(**to), logits.to(**to)


# ---------------------------------------------------------------------------- the baselines


def unfold(x: torch.Tensor, kernel: int, dilation: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, kernel², H, W), zero padded (the references' ``unfold_patches``)."""
    b, c, h, w = x.shape
    out = F.unfold(x, kernel_size=kernel, padding=dilation * (kernel // 2), dilation=dilation)
    return out.reshape(b, c, kernel * kernel, h, w)


def unfold_wo_center(x: torch.Tensor, kernel: int, dilation: int) -> torch.Tensor:
    out = unfold(x, kernel, dilation)
    centre = kernel * kernel // 2
    return torch.cat((out[:, :, :centre], out[:, :, centre + 1:]), dim=2)


def pair_term(logits_centre: torch.Tensor, logits_other: torch.Tensor, kernel: int, dilation: int,
              with_center: bool) -> torch.Tensor:
    """−log P(same label) between each pixel and its unfolded neighbours, in log space (references)."""
    unf = unfold if with_center else unfold_wo_center
    log_fg, log_bg = F.logsigmoid(logits_centre), F.logsigmoid(-logits_centre)
    log_fg_unf = unf(F.logsigmoid(logits_other), kernel, dilation)
    log_bg_unf = unf(F.logsigmoid(-logits_other), kernel, dilation)
    same_fg = log_fg[:, :, None] + log_fg_unf
    same_bg = log_bg[:, :, None] + log_bg_unf
    top = torch.max(same_fg, same_bg)
    return -(torch.log(torch.exp(same_fg - top) + torch.exp(same_bg - top)) + top)[:, 0]


def tk_unfold_layer(logits, lab, union, pairs, cfg):
    """One layer's TK-Loss the MaskFreeVIS way: similarities and top-K recomputed per layer."""
    p, w, d, k = cfg["patch_size"], cfg["window"], cfg["dilation"], cfg["k"]
    _, _, h, wd = lab.shape
    inside = unfold(torch.ones(1, 1, h, wd, dtype=lab.dtype, device=lab.device), w, d)[:, 0] > 0
    total = 0.0
    for a, b in pairs:
        desc_b = unfold(lab[b:b + 1], p, 1).reshape(1, -1, h, wd)  # (1, 3P², H, W)
        desc_a = unfold(lab[a:a + 1], p, 1).reshape(1, -1, h, wd)
        window = unfold(desc_a, w, d)  # (1, 3P², w², H, W)
        sim = torch.exp(-0.5 * torch.norm(desc_b[:, :, None] - window, dim=1))  # (1, w², H, W)
        sim = torch.where(inside, sim, -1.0)  # out-of-frame candidates: never matches (ours)
        kept = torch.zeros_like(sim).scatter_(1, sim.topk(k, dim=1).indices, 1.0)
        weights = (kept * (sim >= cfg["threshold"])) * union  # (N, w², H, W)
        losses = pair_term(logits[:, b:b + 1], logits[:, a:a + 1], w, d, with_center=True)
        total = total + (losses * weights).sum() / weights.sum().clamp(min=1.0)
    return total


def pairwise_unfold_similarity(lab_frame, valid, cfg):
    """AdelaiDet ``get_images_color_similarity``: once per image, (1, 8, H, W)."""
    unf = unfold_wo_center(lab_frame[None], cfg["kernel"], cfg["dilation"])
    sim = torch.exp(-torch.norm(lab_frame[None, :, None] - unf, dim=1) * 0.5)
    valid_unf = unfold_wo_center(valid[None, None].to(lab_frame.dtype), cfg["kernel"], cfg["dilation"])
    return sim * valid_unf[:, 0]


def pairwise_unfold_layer(logits, similarity, boxes, cfg):
    losses = pair_term(logits[:, None], logits[:, None], cfg["kernel"], cfg["dilation"], with_center=False)
    weights = (similarity >= cfg["threshold"]).to(logits.dtype) * boxes[:, None]
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------- variants


def run_variant(name, lab, boxes, layers):
    """One iteration's loss over all layers (the caller runs backward)."""
    pairs = default_pairs(lab.shape[0])
    if name == "tk_ours":
        affinity = tk_affinity(lab, **TK)
        return sum(tk_loss(x, boxes, affinity) for x in layers)
    if name == "tk_unfold":
        union = boxes.amax(dim=1, keepdim=True)
        return sum(tk_unfold_layer(x, lab, union, pairs, TK) for x in layers)
    key = lab[0]  # the pairwise term is computed on the key frame
    valid = torch.ones(key.shape[-2:], dtype=torch.bool, device=key.device)
    if name == "pairwise_ours":
        return sum(pairwise_loss(x[:, 0], key, boxes[:, 0], valid=valid, **PAIRWISE) for x in layers)
    if name == "pairwise_unfold":
        similarity = pairwise_unfold_similarity(key, valid, PAIRWISE)
        return sum(pairwise_unfold_layer(x[:, 0], similarity, boxes[:, 0], PAIRWISE) for x in layers)
    raise ValueError(name)


def _iteration(name, lab, boxes, logits):
    layers = [x.clone().requires_grad_(True) for x in logits]
    loss = run_variant(name, lab, boxes, layers)
    loss.backward()
    return loss.detach(), [x.grad for x in layers]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(name, args) -> dict:
    """In a fresh process: a warm-up iteration, then either one iteration's peak memory or the best
    of ``repeats`` timed iterations."""
    device = torch.device(args.device)
    lab, boxes, logits = make_inputs(args.layers, args.instances, args.frames, *args.size, torch.float32, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss, _ = _iteration(name, lab, boxes, logits)  # warm-up (compilation, thread pools)
    sync()
    result = {"variant": name, "loss": loss.item()}
    if args.measure == "memory":
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            before = _status_kib("VmRSS") * 1024
        _iteration(name, lab, boxes, logits)
        sync()
        result["peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - before
    else:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _iteration(name, lab, boxes, logits)
            sync()
            times.append(time.perf_counter() - start)
        result["seconds"] = min(times)
    return result


def check_equal(args) -> bool:
    """Both formulations in float64 on the same inputs: equal losses and gradients."""
    lab, boxes, logits = make_inputs(min(args.layers, 2), args.instances, args.frames, *args.size,
                                     torch.float64, torch.device(args.device))
    ok = True
    for ours, base in (("tk_ours", "tk_unfold"), ("pairwise_ours", "pairwise_unfold")):
        (l1, g1), (l2, g2) = _iteration(ours, lab, boxes, logits), _iteration(base, lab, boxes, logits)
        same = torch.allclose(l1, l2, rtol=1e-9, atol=1e-12) and all(
            torch.allclose(a, b, rtol=1e-7, atol=1e-12) for a, b in zip(g1, g2))
        print(f"{ours.split('_')[0]:>8}: loss ours {l1.item():.12f}  unfold {l2.item():.12f}  "
              f"same loss and gradients (float64): {same}")
        ok &= same
    affinity = tk_affinity(lab, **TK)
    print(f"          TK matches: {affinity.num_matches} = {affinity.matches.double().mean().item():.1%} "
          f"of the kept candidates")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (default: torch's, here %(default)s)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return 0

    print(f"device {args.device}, torch threads {torch.get_num_threads()}; L={args.layers} layers, "
          f"N={args.instances} instances, T={args.frames}, {args.size[0]}x{args.size[1]} masks "
          f"(frames {4 * args.size[0]}x{4 * args.size[1]}); TK {TK}; pairwise {PAIRWISE}")
    equal = check_equal(args)
    # memory runs: glibc serves allocations ≥ 64 KiB by mmap and gives freed memory back, so the
    # resident set follows the live tensors; timing runs keep the default allocator behaviour
    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = {}
    for name in VARIANTS:
        results[name] = {}
        for what, env in (("time", os.environ), ("memory", memory_env)):
            cmd = [sys.executable, __file__, "--variant", name, "--measure", what, "--device", args.device,
                   "--layers", str(args.layers), "--instances", str(args.instances), "--frames", str(args.frames),
                   "--size", *map(str, args.size), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stdout + out.stderr)
                return 1
            results[name].update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{'variant':<18}{'fwd+bwd ms':>12}{'peak MiB':>11}{'loss (float32)':>18}")
    for name, r in results.items():
        print(f"{name:<18}{r['seconds'] * 1e3:>12.1f}{r['peak_bytes'] / 2**20:>11.1f}{r['loss']:>18.6f}")
    print()
    for term in ("tk", "pairwise"):
        base, ours = results[f"{term}_unfold"], results[f"{term}_ours"]
        memory = (f"{base['peak_bytes'] / ours['peak_bytes']:.1f}x" if ours["peak_bytes"] >= 2**20
                  else "n/a (ours < 1 MiB)")
        print(f"{term:>8}: {base['seconds'] / ours['seconds']:.1f}x faster, {memory} lower peak memory "
              f"than the unfold formulation")
    print(f"same losses and gradients (float64): {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
