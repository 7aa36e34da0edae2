"""Loss kernels against naive references written here from the definitions (docs/design.md §4.1, §4.2).

The references loop explicitly over pixels, offsets, patch entries and instances in float64 numpy;
the kernels must match them to 1e-9. Sizes are tiny so the loops stay fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pmvis.kernels import (
    TKAffinity,
    default_pairs,
    pairwise_loss,
    projection_loss,
    pseudo_mask_loss,
    rgb_to_lab,
    tk_affinity,
    tk_loss,
    warmup_factor,
)

TOL = dict(rtol=1e-9, atol=1e-9)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _edge(xi: float, xj: float) -> float:
    pi, pj = _sigmoid(xi), _sigmoid(xj)
    return -math.log(pi * pj + (1 - pi) * (1 - pj))


# ------------------------------------------------------------------------------------------ LAB


def _naive_lab_pixel(r: float, g: float, b: float) -> tuple[float, float, float]:
    def linear(c: float) -> float:
        c /= 255.0
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = (0.412453 * rl + 0.357580 * gl + 0.180423 * bl) / 0.95047
    y = (0.212671 * rl + 0.715160 * gl + 0.072169 * bl) / 1.0
    z = (0.019334 * rl + 0.119193 * gl + 0.950227 * bl) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def _rgb_samples(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(shape, generator=g, dtype=torch.float64) * 255
    flat = rgb.view(-1)
    # extremes and values around both thresholds (0.04045·255 ≈ 10.31; dark XYZ ≈ 0.008856)
    specials = torch.tensor([0, 255, 10.31, 10.32, 1.0, 2.5, 254.9, 0.01], dtype=torch.float64)
    flat[: specials.numel()] = specials
    return rgb


def test_lab_matches_formula():
    rgb = _rgb_samples((2, 3, 4, 5))
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape and lab.dtype == torch.float64
    for n in range(2):
        for y in range(4):
            for x in range(5):
                expect = _naive_lab_pixel(*rgb[n, :, y, x].tolist())
                assert np.allclose(lab[n, :, y, x].numpy(), expect, atol=1e-3)
                assert np.allclose(lab[n, :, y, x].numpy(), expect, atol=1e-9)


def test_lab_matches_skimage():
    skcolor = pytest.importorskip("skimage.color")
    rgb = _rgb_samples((3, 9, 11), seed=1)
    expect = skcolor.rgb2lab(rgb.permute(1, 2, 0).numpy() / 255.0)
    got = rgb_to_lab(rgb).permute(1, 2, 0).numpy()
    assert np.abs(got - expect).max() < 1e-3
    got32 = rgb_to_lab(rgb.float())
    assert got32.dtype == torch.float32
    assert np.abs(got32.permute(1, 2, 0).double().numpy() - expect).max() < 1e-3
    assert rgb_to_lab(rgb.to(torch.uint8)).dtype == torch.float32


def test_lab_rejects_bad_shape():
    with pytest.raises(ValueError):
        rgb_to_lab(torch.zeros(4, 5, 6))


# ----------------------------------------------------------------------------------- projection


def _naive_projection(logits: np.ndarray, boxes: np.ndarray) -> list[float]:
    out = []
    for m, b in zip(logits, boxes):
        h, w = m.shape
        p = [[_sigmoid(m[y, x]) for x in range(w)] for y in range(h)]
        total = 0.0
        for axis_len, other_len, get in ((w, h, lambda a, o: (p[o][a], b[o, a])),   # max over y
                                         (h, w, lambda a, o: (p[a][o], b[a, o]))):  # max over x
            px = [max(get(a, o)[0] for o in range(other_len)) for a in range(axis_len)]
            bx = [max(get(a, o)[1] for o in range(other_len)) for a in range(axis_len)]
            inter = sum(u * v for u, v in zip(px, bx))
            total += 1 - 2 * inter / (sum(u * u for u in px) + sum(v * v for v in bx) + 1e-5)
        out.append(total)
    return out


def _boxes(n, h, w, seed, frames=None):
    """Random rectangle masks; instance 1 (when present) is empty in every frame."""
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if frames is None else (n, frames, h, w)
    out = np.zeros(shape)
    for i in range(n):
        if i == 1:
            continue
        for t in range(1 if frames is None else frames):
            y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
            if frames is None:
                out[i, y0:y1, x0:x1] = 1
            elif rng.random() < 0.8:  # sometimes absent in a frame
                out[i, t, y0:y1, x0:x1] = 1
    return torch.from_numpy(out)


def test_projection_matches_naive():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 7, dtype=torch.float64) * 2
    boxes = _boxes(3, 6, 7, seed=0)
    got = projection_loss(logits, boxes, reduction="none")
    expect = _naive_projection(logits.numpy(), boxes.numpy())
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), **TOL)
    torch.testing.assert_close(projection_loss(logits, boxes), got.mean(), **TOL)


def test_projection_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    boxes = _boxes(2, 5, 6, seed=1)
    assert torch.autograd.gradcheck(lambda x: projection_loss(x, boxes), (logits,))


# ------------------------------------------------------------------------------------- pairwise


def _naive_pairwise(logits, lab, boxes, kernel, dilation, threshold, valid):
    n, h, w = logits.shape
    half = kernel // 2
    num = den = 0.0
    for i in range(n):
        im = lab if lab.ndim == 3 else lab[i]
        ok = None if valid is None else (valid if valid.ndim == 2 else valid[i])
        for y in range(h):
            for x in range(w):
                for oy in range(-half, half + 1):
                    for ox in range(-half, half + 1):
                        if oy == 0 and ox == 0:
                            continue
                        yy, xx = y + dilation * oy, x + dilation * ox
                        if not (0 <= yy < h and 0 <= xx < w):
                            continue  # out-of-image neighbours are not edges
                        dist = math.sqrt(sum((im[c, y, x] - im[c, yy, xx]) ** 2 for c in range(3)))
                        wgt = float(math.exp(-0.5 * dist) >= threshold) * boxes[i, y, x]
                        if ok is not None:
                            wgt *= float(ok[y, x] and ok[yy, xx])
                        if wgt:
                            num += _edge(logits[i, y, x], logits[i, yy, xx]) * wgt
                            den += wgt
    return num / max(den, 1.0)


PAIRWISE_CASES = [
    dict(kernel=3, dilation=2, threshold=0.3, per_instance_lab=False, valid=None),
    dict(kernel=3, dilation=1, threshold=0.3, per_instance_lab=True, valid="image"),
    dict(kernel=5, dilation=1, threshold=0.2, per_instance_lab=False, valid="instance"),
    dict(kernel=3, dilation=3, threshold=0.5, per_instance_lab=True, valid=None),
]


def _pairwise_inputs(case, seed, n=3, h=8, w=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, h, w, generator=g, dtype=torch.float64) * 2
    shape = (n, 3, h, w) if case["per_instance_lab"] else (3, h, w)
    lab = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    boxes = _boxes(n, h, w, seed)
    if n > 2:  # an irregular, soft mask touching the image border
        boxes[2] = torch.rand(h, w, generator=g, dtype=torch.float64) * (torch.rand(h, w, generator=g) > 0.6)
        boxes[2, -1, -1] = 0.5
    valid = None
    if case["valid"] == "image":
        valid = torch.ones(h, w, dtype=torch.bool)
        valid[-2:] = False  # BoxInst's ignored bottom rows
    elif case["valid"] == "instance":
        valid = torch.rand(n, h, w, generator=g) > 0.2
    return logits, lab, boxes, valid


@pytest.mark.parametrize("case", PAIRWISE_CASES)
def test_pairwise_matches_naive(case):
    logits, lab, boxes, valid = _pairwise_inputs(case, seed=3)
    kw = dict(kernel=case["kernel"], dilation=case["dilation"], threshold=case["threshold"])
    expect = _naive_pairwise(logits.numpy(), lab.numpy(), boxes.numpy(), valid=None if valid is None
                             else valid.numpy(), **kw)
    assert expect > 0
    got = pairwise_loss(logits, lab, boxes, valid=valid, **kw)
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), **TOL)


def test_pairwise_gradcheck():
    logits, lab, boxes, valid = _pairwise_inputs(PAIRWISE_CASES[1], seed=4, n=2, h=6, w=7)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pairwise_loss(x, lab, boxes, valid=valid, kernel=3,
                                                            dilation=1), (logits,))


def test_pairwise_empty_and_warmup():
    logits = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    loss = pairwise_loss(logits, torch.rand(3, 5, 5, dtype=torch.float64), torch.zeros(2, 5, 5))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().sum() == 0
    empty = pairwise_loss(torch.zeros(0, 5, 5), torch.rand(3, 5, 5), torch.zeros(0, 5, 5))
    assert empty.item() == 0.0
    assert warmup_factor(0, 10_000) == 0.0
    assert warmup_factor(2_500, 10_000) == 0.25
    assert warmup_factor(20_000, 10_000) == 1.0


# -------------------------------------------------------------------------------------- TK-Loss


def _naive_tk_matches(lab, pairs, patch, window, dilation, k, threshold):
    """Per pair: {(y, x): [(candidate index, y', x', is_match) for the k kept]}."""
    t, _, h, w = lab.shape
    r, half = patch // 2, window // 2

    def descriptor(f, y, x):
        values = []
        for c in range(3):
            for oy in range(-r, r + 1):
                for ox in range(-r, r + 1):
                    yy, xx = y + oy, x + ox
                    values.append(lab[f, c, yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0)
        return np.array(values)

    desc = {(f, y, x): descriptor(f, y, x) for f in range(t) for y in range(h) for x in range(w)}
    out = []
    for a, b in pairs:
        kept_by_pixel = {}
        for y in range(h):
            for x in range(w):
                cands = []
                index = 0
                for i in range(-half, half + 1):
                    for j in range(-half, half + 1):
                        yy, xx = y + dilation * i, x + dilation * j
                        if 0 <= yy < h and 0 <= xx < w:
                            diff = desc[(b, y, x)] - desc[(a, yy, xx)]
                            s = math.exp(-0.5 * math.sqrt(float(np.sum(diff * diff))))
                        else:
                            s = -math.inf  # out-of-frame: ranked last, never a match
                        cands.append((s, index, yy, xx))
                        index += 1
                kept = sorted(cands, key=lambda c: (-c[0], c[1]))[:k]  # ties: lowest index first
                kept_by_pixel[(y, x)] = [(ci, yy, xx, s >= threshold) for s, ci, yy, xx in kept]
        out.append(kept_by_pixel)
    return out


def _naive_tk_loss(logits, boxes, pairs, matches):
    n, t, h, w = logits.shape
    union = boxes.max(axis=1)
    total = 0.0
    for (a, b), kept_by_pixel in zip(pairs, matches):
        num = den = 0.0
        for i in range(n):
            for (y, x), kept in kept_by_pixel.items():
                for _, yy, xx, is_match in kept:
                    wgt = float(is_match) * union[i, y, x]
                    if wgt:
                        num += _edge(logits[i, b, y, x], logits[i, a, yy, xx]) * wgt
                        den += wgt
        total += num / max(den, 1.0)
    return total


TK_CASES = [  # patch, window, dilation, k, frames, pairs
    (3, 3, 3, 5, 3, None),
    (1, 3, 1, 1, 2, None),
    (5, 5, 1, 9, 3, None),
    (3, 5, 3, 9, 5, "cyclic"),
    (1, 5, 3, 5, 5, [(0, 4), (2, 1), (3, 0)]),
    (5, 3, 3, 9, 2, [(1, 0)]),
    (3, 3, 1, 1, 5, None),
    (1, 3, 3, 5, 3, [(2, 0), (0, 2)]),
]


def _tk_inputs(patch, frames, seed, n=3, h=7, w=9):
    g = torch.Generator().manual_seed(seed)
    # descriptor distances near the threshold's scale: kept candidates are both matches and not
    lab = torch.rand(frames, 3, h, w, generator=g, dtype=torch.float64) * (16.0 if patch == 1 else 9.0 / patch)
    logits = torch.randn(n, frames, h, w, generator=g, dtype=torch.float64) * 2
    return lab, logits, _boxes(n, h, w, seed, frames=frames)


def _check_affinity(aff: TKAffinity, naive, k):
    for p, kept_by_pixel in enumerate(naive):
        for (y, x), kept in kept_by_pixel.items():
            assert [c for c, *_ in kept] == aff.candidates[p, :, y, x].tolist()
            assert [m for *_, m in kept] == aff.matches[p, :, y, x].tolist()
    assert aff.candidates.shape[1] == k


@pytest.mark.parametrize("patch,window,dilation,k,frames,pairs", TK_CASES)
def test_tk_matches_naive(patch, window, dilation, k, frames, pairs):
    lab, logits, boxes = _tk_inputs(patch, frames, seed=patch * 100 + window * 10 + k)
    kw = dict(patch_size=patch, window=window, dilation=dilation, k=k, threshold=0.05)
    if pairs == "cyclic":
        aff = tk_affinity(lab, cyclic=True, **kw)
        pair_list = default_pairs(frames, cyclic=True)
    else:
        aff = tk_affinity(lab, pairs=pairs, **kw)
        pair_list = default_pairs(frames) if pairs is None else pairs
    assert list(aff.pairs) == [tuple(p) for p in pair_list]
    naive = _naive_tk_matches(lab.numpy(), pair_list, threshold=0.05, patch=patch, window=window,
                              dilation=dilation, k=k)
    _check_affinity(aff, naive, k)
    frac = aff.matches.double().mean().item()
    assert 0.05 < frac < 0.98, frac  # the settings exercise both matches and non-matches
    expect = _naive_tk_loss(logits.numpy(), boxes.numpy(), pair_list, naive)
    assert expect > 0
    for chunk in (None, 1, 2):
        got = tk_loss(logits, boxes, aff, chunk_size=chunk)
        torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), **TOL)


def test_tk_ties_keep_lowest_index():
    """Integer LAB values make many exactly equal similarities; the tie rule must match."""
    g = torch.Generator().manual_seed(7)
    lab = torch.randint(0, 2, (3, 3, 6, 7), generator=g).double()
    lab[1] = lab[0]  # identical frames: interior candidates tie at s = 1
    lab[2] = 0.0  # a black frame: its zero padding ties with the inside
    for patch, k in ((3, 5), (1, 4)):
        aff = tk_affinity(lab, patch_size=patch, window=3, dilation=1, k=k, threshold=0.05)
        naive = _naive_tk_matches(lab.numpy(), aff.pairs, patch, 3, 1, k, 0.05)
        _check_affinity(aff, naive, k)
        logits = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
        boxes = torch.ones(2, 3, 6, 7, dtype=torch.float64)
        expect = _naive_tk_loss(logits.numpy(), boxes.numpy(), aff.pairs, naive)
        torch.testing.assert_close(tk_loss(logits, boxes, aff), torch.tensor(expect, dtype=torch.float64), **TOL)


def test_tk_affinity_is_compact_and_gradient_free():
    lab, logits, boxes = _tk_inputs(3, 3, seed=11)
    lab.requires_grad_(True)
    aff = tk_affinity(lab)
    assert aff.candidates.shape == (3, 5, 7, 9) and aff.matches.shape == (3, 5, 7, 9)
    assert aff.num_matches == int(aff.matches.sum())
    assert aff.src.shape == aff.dst.shape == aff.pair_index.shape == (aff.num_matches,)
    assert not any(t.requires_grad for t in (aff.src, aff.dst))
    # the matched candidate lies at the stored window offset of the pixel
    hw = 7 * 9
    for s, d, p in list(zip(aff.src.tolist(), aff.dst.tolist(), aff.pair_index.tolist()))[:50]:
        a, b = aff.pairs[p]
        assert s // hw == b and d // hw == a
        dy, dx = (d % hw) // 9 - (s % hw) // 9, (d % hw) % 9 - (s % hw) % 9
        assert dy % 3 == 0 and dx % 3 == 0 and abs(dy) <= 3 and abs(dx) <= 3


def test_tk_gradcheck():
    lab, logits, boxes = _tk_inputs(3, 3, seed=5, n=2, h=5, w=6)
    logits.requires_grad_(True)
    for pairs, chunk in ((None, None), ([(2, 0), (1, 2)], 1)):
        aff = tk_affinity(lab, pairs=pairs, dilation=1)
        assert aff.num_matches > 0
        assert torch.autograd.gradcheck(lambda x: tk_loss(x, boxes, aff, chunk_size=chunk), (logits,))


def test_tk_reused_across_layers_and_float32():
    lab, logits, boxes = _tk_inputs(3, 3, seed=9)
    aff = tk_affinity(lab)
    layers = [logits.clone().requires_grad_(True) for _ in range(3)]
    total = sum(tk_loss(x, boxes, aff) for x in layers)
    total.backward()
    for x in layers[1:]:
        torch.testing.assert_close(x.grad, layers[0].grad, **TOL)
    aff32 = tk_affinity(lab.float())
    assert torch.equal(aff32.matches, aff.matches)  # no near-threshold pixels in this input
    torch.testing.assert_close(tk_loss(logits.float(), boxes.float(), aff32),
                               tk_loss(logits, boxes, aff).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frames,pairs", [(3, None), (5, "cyclic"), (3, [(2, 0), (1, 2)])])
def test_tk_pair_affinity_is_the_two_frame_clip_of_that_pair(frames, pairs):
    """``TKAffinity.pair_affinity(p)`` = the affinity of the 2-frame clip (a, b) with pairs ((0, 1),),
    and Σ over pairs of the loss on each pair's 2-frame logits (U from the whole clip) = the loss."""
    lab, logits, boxes = _tk_inputs(3, frames, seed=21)
    aff = tk_affinity(lab, cyclic=True) if pairs == "cyclic" else tk_affinity(lab, pairs=pairs)
    union = boxes.amax(1, keepdim=True).expand(-1, 2, -1, -1)
    total = 0.0
    for p, (a, b) in enumerate(aff.pairs):
        sub = aff.pair_affinity(p)
        alone = tk_affinity(lab[[a, b]], pairs=[(0, 1)])
        assert sub.pairs == ((0, 1),) and sub.frames == 2 and (sub.height, sub.width) == (aff.height, aff.width)
        for name in ("candidates", "matches", "src", "dst", "pair_index"):
            assert torch.equal(getattr(sub, name), getattr(alone, name)), name
        total = total + tk_loss(logits[:, [a, b]], union, sub)
    torch.testing.assert_close(total, tk_loss(logits, boxes, aff), **TOL)
    with pytest.raises(IndexError):
        aff.pair_affinity(len(aff.pairs))


def test_tk_edge_cases():
    lab, logits, boxes = _tk_inputs(3, 3, seed=2)
    aff = tk_affinity(lab)
    x = logits.clone().requires_grad_(True)
    loss = tk_loss(x, torch.zeros_like(boxes), aff)  # no boxes: no weight anywhere
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.abs().sum() == 0
    assert tk_loss(logits[:0], boxes[:0], aff).item() == 0.0
    with pytest.raises(ValueError):
        tk_loss(logits[:, :2], boxes[:, :2], aff)
    with pytest.raises(ValueError):
        tk_affinity(lab[:1])
    with pytest.raises(ValueError):
        tk_affinity(lab, k=10)
    with pytest.raises(ValueError):
        tk_affinity(lab, patch_size=2)
    with pytest.raises(ValueError):
        tk_affinity(lab, pairs=[(0, 0)])
    with pytest.raises(ValueError):
        tk_affinity(lab, pairs=[(0, 3)])
    assert default_pairs(3) == ((0, 1), (0, 2), (1, 2))
    assert default_pairs(5, cyclic=True) == ((0, 1), (1, 2), (2, 3), (3, 4), (4, 0))


# ---------------------------------------------------------------------------------- pseudo mask


def _naive_pseudo(logits, targets, weights, alpha=0.25, gamma=2.0, wf=2.0, wd=5.0):
    n = logits.shape[0]
    focal = dice = 0.0
    for i in range(n):
        xs, ts = logits[i].ravel(), targets[i].ravel()
        f = 0.0
        inter = ps = tsum = 0.0
        for x, t in zip(xs, ts):
            p = _sigmoid(x)
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            f += ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))
            inter += p * t
            ps += p
            tsum += t
        focal += weights[i] * f / len(xs)
        dice += weights[i] * (1 - (2 * inter + 1) / (ps + tsum + 1))
    return wf * focal / n, wd * dice / n


def test_pseudo_mask_matches_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64) * 2
    targets = (torch.rand(3, 2, 5, 6, generator=g) > 0.5).double()
    targets[1] = 0.0
    weights = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    for w in (None, weights):
        terms = pseudo_mask_loss(logits, targets, weights=w, return_terms=True)
        focal, dice = _naive_pseudo(logits.numpy(), targets.numpy(), np.ones(3) if w is None else w.numpy())
        torch.testing.assert_close(terms["focal"], torch.tensor(focal, dtype=torch.float64), **TOL)
        torch.testing.assert_close(terms["dice"], torch.tensor(dice, dtype=torch.float64), **TOL)
        torch.testing.assert_close(pseudo_mask_loss(logits, targets, weights=w),
                                   torch.tensor(focal + dice, dtype=torch.float64), **TOL)


def test_pseudo_mask_gradcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(2, 4, 5, generator=g) > 0.5).double()
    weights = torch.tensor([0.3, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: pseudo_mask_loss(x, targets, weights=weights), (logits,))
    assert pseudo_mask_loss(logits[:0], targets[:0]).item() == 0.0
