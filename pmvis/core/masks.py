"""Masks as compressed RLE: the one encoding pmvis stores and passes around.

An ``Rle`` is ``{"size": [H, W], "counts": str}``: pycocotools' compressed form with str counts
so it is JSON-serialisable; ``to_coco_rles`` turns them into the bytes form pycocotools' C
functions take. Every encoder in pmvis goes through :func:`encode_mask`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict  # {"size": [H, W], "counts": str}


def encode_mask(mask: np.ndarray) -> Rle:
    """Binary (H, W) mask → compressed RLE with str counts (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: Rle) -> np.ndarray:
    return mask_utils.decode(to_coco_rle(rle)).astype(bool)


def to_coco_rle(rle: Rle) -> dict:
    """Our str-counts RLE → the bytes-counts form pycocotools' C functions take."""
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def from_coco_rle(coco: dict) -> Rle:
    """pycocotools' bytes-counts RLE → our str-counts form."""
    counts = coco["counts"]
    return {"size": [int(coco["size"][0]), int(coco["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def to_coco_rles(rles: Sequence[Rle]) -> list[dict]:
    return [to_coco_rle(r) for r in rles]


# pycocotools 2.0.11's ``area`` overflows on lists longer than 255 (a uint8 count): call in chunks.
_AREA_CHUNK = 255


def rle_areas(coco_rles: Sequence[dict]) -> np.ndarray:
    """Areas of pycocotools-form RLEs (bytes counts) as int64, any number of them."""
    if not coco_rles:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([
        np.asarray(mask_utils.area(list(coco_rles[i:i + _AREA_CHUNK])), dtype=np.int64)
        for i in range(0, len(coco_rles), _AREA_CHUNK)
    ])


def box_mask_rle(box: Sequence[float], height: int, width: int) -> Rle:
    """A filled ``[x, y, w, h]`` box as a mask (pixels whose centres lie inside the box)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = int(round(box[0])), int(round(box[1]))
    x1, y1 = int(round(box[0] + box[2])), int(round(box[1] + box[3]))
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return encode_mask(mask)


def compressed_rle_total(counts: str) -> int:
    """Sum of the run lengths of a compressed RLE string (pycocotools' LEB128-like code).

    Decoding only the run lengths checks a string's integrity without allocating the mask.
    Raises ValueError on a malformed string (bad characters, truncated run, negative run).
    """
    total = 0
    runs: list[int] = []
    p = 0
    n = len(counts)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                raise ValueError("truncated run")
            c = ord(counts[p]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"invalid character {counts[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("negative run length")
        runs.append(x)
        total += x
    return total


# pycocotools writes a run (a delta from the run two back) in at most 7 characters of 5 bits:
# a uint32 count's delta fits in 35 bits. A longer run is malformed (and would overflow int64).
_MAX_RUN_CHARS = 7


def compressed_rle_totals(counts: Sequence[str]) -> np.ndarray:
    """Vectorised :func:`compressed_rle_total` over many strings: each one's pixel total, or -1
    where it is malformed (bad character, truncated or over-long run, negative run length).

    Numpy over the concatenated characters, so validating a whole raw-store file costs about as
    much as reading it (the per-character Python loop takes ~1 ms per 720p mask)."""
    n = len(counts)
    totals = np.zeros(n, dtype=np.int64)
    if n == 0:
        return totals
    encoded = []
    for c in counts:
        try:
            encoded.append(c.encode("ascii") if isinstance(c, str) else b"\x00")
        except UnicodeEncodeError:
            encoded.append(b"\x00")  # not in pycocotools' alphabet: flagged below
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=n)
    bad = np.zeros(n, dtype=bool)
    if lengths.sum() == 0:
        return totals
    c = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64) - 48
    sid = np.repeat(np.arange(n), lengths)
    bad[sid[(c < 0) | (c > 63)]] = True
    c &= 63
    more = (c & 0x20) != 0
    last = np.cumsum(lengths)[lengths > 0] - 1
    bad[sid[last[more[last]]]] = True  # the last run of a string is unfinished: truncated
    run_end = ~more
    run_end[last] = True  # never let a run continue into the next string
    ends = np.flatnonzero(run_end)
    starts = np.concatenate(([0], ends[:-1] + 1))
    run_len = ends - starts + 1
    run_sid = sid[starts]
    bad[run_sid[run_len > _MAX_RUN_CHARS]] = True
    run_len = np.minimum(run_len, _MAX_RUN_CHARS)
    k = np.minimum(np.arange(len(c)) - np.repeat(starts, ends - starts + 1), _MAX_RUN_CHARS - 1)
    d = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    negative = (c[ends] & 0x10) != 0
    d[negative] -= np.left_shift(1, 5 * run_len[negative])  # sign extension
    # Run j >= 3 is stored as a delta from run j - 2: cumulative sums along each string's odd
    # chain (runs 1, 3, ...) and even chain (runs 2, 4, ...; run 0 stands alone).
    first_run = np.searchsorted(run_sid, run_sid)  # index of the first run of each run's string
    j = np.arange(len(ends)) - first_run
    runs = d.copy()
    for in_chain in ((j % 2 == 1), (j % 2 == 0) & (j > 0)):
        cs = np.cumsum(np.where(in_chain, d, 0))
        runs = np.where(in_chain, cs - cs[first_run], runs)  # run 0 is in neither chain
    bad[run_sid[runs < 0]] = True
    string_starts = np.flatnonzero(j == 0)
    totals[run_sid[string_starts]] = np.add.reduceat(runs, string_starts)
    totals[bad] = -1
    return totals
