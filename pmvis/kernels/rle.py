"""Compiled run-length kernels for the evaluator: parse compressed RLEs once, intersect by walking runs.

pycocotools' ``mask.iou`` parses both masks again on every call and computes each mask's box
(a division per run) before it walks the runs; over a YouTube-VIS-sized evaluation that parse
and box work, not the walk, is most of the time. Here every mask of a video is parsed once
(``parse_counts``: the ``rleFrString`` format of pycocotools — 5-bit chunks from character 48,
bit 0x20 "more follows", bit 0x10 of the last chunk the sign, runs from the third on stored as
deltas to the run two before), and an intersection is one merge walk over the two run lists
(``pair_intersections``). Both are numba-compiled (``cache=True``: compiled once per machine).

Runs are column-major and start with background, so odd runs are foreground — the COCO layout.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _parse(chars: np.ndarray, bounds: np.ndarray, runs: np.ndarray, offsets: np.ndarray,
           areas: np.ndarray, totals: np.ndarray) -> None:
    m = 0
    for s in range(len(bounds) - 1):
        offsets[s] = m
        first = m
        p, end = bounds[s], bounds[s + 1]
        area = 0
        total = 0
        while p < end:
            x = 0
            k = 0
            more = True
            while more and p < end:
                c = np.int64(chars[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more = (c & 0x20) != 0
                p += 1
                k += 1
                if not more and (c & 0x10) != 0:
                    x |= np.int64(-1) << (5 * k)
            if m - first > 2:
                x += runs[m - 2]
            runs[m] = x
            total += x
            if (m - first) % 2 == 1:
                area += x
            m += 1
        areas[s] = area
        totals[s] = total
    offsets[len(bounds) - 1] = m


def parse_counts(counts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse compressed-RLE ``counts`` strings (validated ones: the data layer checks them).

    Returns ``(runs, offsets, areas, totals)``: mask ``s``'s runs are ``runs[offsets[s]:offsets[s+1]]``,
    its foreground area ``areas[s]`` and its run total (height × width for a valid mask) ``totals[s]``.
    """
    encoded = "".join(counts).encode("ascii")
    bounds = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in counts], out=bounds[1:])
    chars = np.frombuffer(encoded, dtype=np.uint8)
    runs = np.empty(len(chars), dtype=np.int64)  # every run takes at least one character
    offsets = np.empty(len(counts) + 1, dtype=np.int64)
    areas = np.empty(len(counts), dtype=np.int64)
    totals = np.empty(len(counts), dtype=np.int64)
    _parse(chars, bounds, runs, offsets, areas, totals)
    return runs[: offsets[-1]], offsets, areas, totals


@numba.njit(cache=True, nogil=True)
def _intersections(runs: np.ndarray, offsets: np.ndarray, d_masks: np.ndarray, g_masks: np.ndarray,
                   pairs: np.ndarray, out: np.ndarray) -> None:
    for p in range(len(pairs)):
        di, gj = pairs[p, 0], pairs[p, 1]
        total = 0
        for t in range(d_masks.shape[1]):
            a, b = d_masks[di, t], g_masks[gj, t]
            if a < 0 or b < 0:
                continue
            i, i_end = offsets[a], offsets[a + 1]
            j, j_end = offsets[b], offsets[b + 1]
            if i == i_end or j == j_end:
                continue
            ca, cb = runs[i], runs[j]
            fa = fb = False  # both start with background
            while True:
                c = min(ca, cb)
                if fa and fb:
                    total += c
                ca -= c
                cb -= c
                if ca == 0:
                    i += 1
                    if i == i_end:
                        break
                    ca = runs[i]
                    fa = not fa
                if cb == 0:
                    j += 1
                    if j == j_end:
                        break
                    cb = runs[j]
                    fb = not fb
        out[p] = total


def pair_intersections(runs: np.ndarray, offsets: np.ndarray, d_masks: np.ndarray, g_masks: np.ndarray,
                       pairs: np.ndarray) -> np.ndarray:
    """Σ_t |D∩G| for each (detection, ground truth) row of ``pairs``.

    ``d_masks`` / ``g_masks`` (tracks × frames) index masks parsed by :func:`parse_counts`, −1
    where a track has no mask; frames where either side has none add nothing. Every mask must have
    the same run total (one frame size), as the data layer guarantees.
    """
    out = np.zeros(len(pairs), dtype=np.int64)
    if len(pairs):
        _intersections(runs, offsets, np.ascontiguousarray(d_masks, dtype=np.int64),
                       np.ascontiguousarray(g_masks, dtype=np.int64),
                       np.ascontiguousarray(pairs, dtype=np.int64), out)
    return out
