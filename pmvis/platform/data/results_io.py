"""YTVIS results files (predictions): ``[{video_id, category_id, score, segmentations[T]}]``, read and
checked against the ground truth they answer, written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from pmvis.core.errors import PmvisError
from pmvis.core.io import read_json, write_json_atomic
from pmvis.platform.data.ytvis import (
    Result,
    YTVISDataset,
)
from pmvis.platform.data.ytvis_io import Problems, is_finite_number, is_int, normalise_segmentation


def parse_results(raw: Any, gt: YTVISDataset, *, source: str = "<memory>") -> list[Result]:
    """Validate results against the ground truth's videos (length, size) and categories."""
    problems = Problems(source)
    if not isinstance(raw, list):
        raise PmvisError(f"{source}: a results file is a JSON list of predictions, got {type(raw).__name__}")
    results: list[Result] = []
    for i, r in enumerate(raw):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            problems.add(f"{where}: must be an object")
            continue
        vid = r.get("video_id")
        where = f"results[{i}] (video id={vid})"
        video = gt.videos.get(vid) if is_int(vid) else None
        if video is None:
            problems.add(f"{where}: video id is not in the ground truth")
            continue
        cid = r.get("category_id")
        if not is_int(cid) or cid not in gt.categories:
            problems.add(f"{where}: category_id {cid!r} is not in the ground truth")
            continue
        score = r.get("score")
        if not is_finite_number(score):
            problems.add(f"{where}: 'score' must be a finite number, got {score!r}")
            continue
        segs = r.get("segmentations")
        if not isinstance(segs, list) or len(segs) != video.length:
            n = len(segs) if isinstance(segs, list) else segs
            problems.add(f"{where}: 'segmentations' must list {video.length} frames, got {n!r}")
            continue
        out = []
        for t, seg in enumerate(segs):
            try:
                out.append(normalise_segmentation(seg, video.height, video.width))
            except ValueError as e:
                problems.add(f"{where}, frame {t}: {e}")
                out.append(None)
        results.append(Result(video_id=vid, category_id=r["category_id"], score=float(score), segmentations=out))
    problems.raise_if_any()
    return results


def load_results(path: str | os.PathLike, gt: YTVISDataset) -> list[Result]:
    path = Path(path)
    return parse_results(read_json(path), gt, source=str(path))


def save_results(results: Iterable[Result], path: str | os.PathLike) -> None:
    write_json_atomic(path, [r.to_json() for r in results])
