"""A pseudo-mask store made without running any model, for sweep tests (in-process and as a job).

hqsam = the true masks (confidence 0.9), grabcut = the filled true boxes (0.6), on a small
synthetic dataset: enough for trials to re-fuse, train and be scored, in seconds.
"""

from __future__ import annotations

from pathlib import Path

from pmvis.core.masks import decode_mask, encode_mask
from pmvis.platform.data.synthetic import generate_synthetic
from pmvis.platform.data.synthetic_scenes import SynthConfig
from pmvis.platform.data.ytvis_io import load_ytvis
from pmvis.platform.pseudo.store import RawMasks, rows_from_raw_masks, write_video_rows


def make_store(tmp_path: Path) -> tuple[Path, Path]:
    """Synthetic data + a raw store: hqsam = truth (0.9), grabcut = the filled truth box (0.6)."""
    import numpy as np

    data = tmp_path / "data"
    generate_synthetic(data, SynthConfig(videos=3, frames=3, height=48, width=64))
    truth = load_ytvis(data / "truth.json")
    raw = tmp_path / "pm"
    for vid, anns in truth.annotations_by_video().items():
        v = truth.videos[vid]
        per_source: dict[str, list] = {"hqsam": [], "grabcut": []}
        for a in anns:
            tm = [None if s is None else decode_mask(s) for s in a.segmentations]
            boxes = []
            for t, m in enumerate(tm):
                if m is None:
                    boxes.append(None)
                    continue
                x, y, w, h = (int(b) for b in a.bboxes[t])
                b = np.zeros((v.height, v.width), dtype=bool)
                b[y:y + h, x:x + w] = True
                boxes.append(b)
            for source, masks, conf in (("hqsam", tm, 0.9), ("grabcut", boxes, 0.6)):
                per_source[source].append(RawMasks(
                    video_id=vid, annotation_id=a.id, source=source,
                    segmentations=[None if m is None else encode_mask(m) for m in masks],
                    confidences=[None if m is None else conf for m in masks]))
        for source, tracks in per_source.items():
            write_video_rows(raw / "raw", source, vid, rows_from_raw_masks(tracks, v.height, v.width))
    return data, raw
