"""The one refine step: raw pseudo-mask store → fuse → filter, as `pmvis fuse`, `pmvis filter`,
the sweep's trials, the demo and the report all run it.

The segmenters run once; every refinement after that reads only the store, so re-fusing with other
knobs (a sweep trial) costs seconds. ``fuse_input`` says which annotations the fusion's boxes come
from: the original ground truth (``"original"``: the demo and the report compare fused masks and
filtered annotations side by side) or the filtered ones (``"filtered"``: a trial trains on the
filtered file with pseudo masks for exactly its annotations).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pmvis.models.fusion import FuseConfig
from pmvis.platform.data.ytvis import YTVISDataset
from pmvis.platform.pseudo.filters import FilterConfig, filter_annotations
from pmvis.platform.pseudo.fuse import fuse_with_stats
from pmvis.platform.pseudo.store import RawMasks, read_raw


@dataclass
class Refined:
    """What :func:`refine` made; a part not asked for is None."""

    tracks: list[RawMasks]  # what was read from the store
    fused: YTVISDataset | None  # fused pseudo-mask annotations (``info["fusion"]`` holds config and stats)
    fuse_stats: dict[str, Any] | None
    cleaned: YTVISDataset | None  # the filtered annotations (``info["filter"]`` holds config and counts)
    filter_report: list[dict[str, Any]] | None  # findings, sorted by (video, annotation, frame, kind)


def sources_needed(fuse: FuseConfig | None, filt: FilterConfig | None) -> list[str] | None:
    """The store sources a refinement reads (None: every source): the fusion's, and those of the
    filters that are on (RIA fuses with ``filter.fuse``, Missing-Data reads ``missing_sources``)."""
    needs: list[list[str] | None] = []
    if fuse is not None:
        needs.append(fuse.sources)
    if filt is not None:
        if filt.ria:
            needs.append(filt.fuse.sources)
        if filt.missing:
            needs.append(list(filt.missing_sources))
    if not needs or any(n is None for n in needs):
        return None
    return list(dict.fromkeys(s for n in needs for s in n))


def refine(
    raw_dir: str | os.PathLike,
    dataset: YTVISDataset,
    *,
    fuse: FuseConfig | None = None,
    filt: FilterConfig | None = None,
    fuse_input: Literal["original", "filtered"] = "original",
    read_all: bool = False,
) -> Refined:
    """Read the store once (only the sources needed, or ``read_all``), then filter ``dataset``
    (``filt``) and fuse pseudo masks (``fuse``)."""
    tracks = read_raw(raw_dir, sources=None if read_all else sources_needed(fuse, filt))
    cleaned = report = fused = stats = None
    if filt is not None:
        cleaned, report = filter_annotations(dataset, tracks, filt)
    if fuse is not None:
        boxes_from = cleaned if (fuse_input == "filtered" and cleaned is not None) else dataset
        fused, stats = fuse_with_stats(boxes_from, tracks, fuse)
    return Refined(tracks=tracks, fused=fused, fuse_stats=stats, cleaned=cleaned, filter_report=report)
