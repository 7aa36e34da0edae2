"""The YouTube-VIS / OVIS data model: videos, annotations, results, and reading a video's frames.

Segmentations are compressed RLE dicts ``{"size": [H, W], "counts": str}`` whatever the file used
(:mod:`pmvis.platform.data.ytvis_io` normalises them on load), so the rest of pmvis handles one
encoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from pmvis.core.errors import PmvisError
from pmvis.core.masks import Rle

# Largest accepted frame side (pixels): 16K video is 15360 wide. A bound keeps every mask
# decode (H * W bytes) and every pycocotools size field small, whatever a file claims.
MAX_IMAGE_SIDE_PX = 16384
FRAMES_DIRNAME = "JPEGImages"
# A JPEG starts with SOI and ends with EOI; encoders may pad after EOI with zero bytes.
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
JPEG_TRAILING_PADDING = b"\x00"


def frame_file_problem(path: Path, real_root: str) -> str | None:
    """Why ``path`` is not a usable frame file (None if it is): missing, or its real path (symlinks
    followed) outside the frames root's real path ``real_root``, since a link must not pull in files
    from elsewhere."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        return f"frame file {path} resolves to {real}, outside the frames root {real_root}"
    if not os.path.isfile(real):
        return f"frame file {path} is missing"
    return None


@dataclass
class Video:
    id: int
    width: int
    height: int
    file_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.file_names)


@dataclass
class Annotation:
    """One instance track; per-frame lists have the video's length, ``None`` where absent."""

    id: int
    video_id: int
    category_id: int
    segmentations: list[Rle | None]
    bboxes: list[list[float] | None]
    areas: list[float | None]
    iscrowd: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class YTVISDataset:
    videos: dict[int, Video]
    annotations: list[Annotation]
    categories: dict[int, str]
    path: Path | None = None
    frames_root: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def subset(self, video_ids: Iterable[int]) -> "YTVISDataset":
        """These videos (in id order) and their annotations; categories, paths and info kept. An
        evaluation of predictions for some videos scores against this, not the whole file."""
        keep = set(video_ids)
        return YTVISDataset(
            videos={v: self.videos[v] for v in sorted(keep)},
            annotations=[a for a in self.annotations if a.video_id in keep],
            categories=dict(self.categories), path=self.path, frames_root=self.frames_root, info=dict(self.info))

    def annotations_by_video(self) -> dict[int, list[Annotation]]:
        out: dict[int, list[Annotation]] = {vid: [] for vid in self.videos}
        for ann in self.annotations:
            out[ann.video_id].append(ann)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "videos": [
                {**v.extra, "id": v.id, "width": v.width, "height": v.height, "length": v.length,
                 "file_names": v.file_names}
                for v in self.videos.values()
            ],
            "categories": [{"id": cid, "name": name} for cid, name in self.categories.items()],
            "annotations": [
                {**a.extra, "id": a.id, "video_id": a.video_id, "category_id": a.category_id,
                 "iscrowd": a.iscrowd, "segmentations": a.segmentations, "bboxes": a.bboxes,
                 "areas": a.areas}
                for a in self.annotations
            ],
        }

    def _where(self, video_id: int, frame: int) -> str:
        prefix = f"{self.path}: " if self.path is not None else ""
        return f"{prefix}video id={video_id}, frame {frame}"

    def frame_path(self, video_id: int, frame: int) -> Path:
        if self.frames_root is None:
            raise PmvisError(f"{self.path}: no frames root known for this dataset")
        return self.frames_root / self.videos[video_id].file_names[frame]

    def checked_frame_path(self, video_id: int, frame: int) -> Path:
        """The frame's path, refused unless it is a file whose real path (symlinks followed) lies
        inside the frames root's real path: a link must not pull files from elsewhere."""
        path = self.frame_path(video_id, frame)
        problem = frame_file_problem(path, os.path.realpath(self.frames_root))
        if problem:
            raise PmvisError(f"{self._where(video_id, frame)}: {problem}")
        return path

    def read_frame(self, video_id: int, frame: int) -> np.ndarray:
        """RGB uint8 (H, W, 3); a missing, corrupt, truncated or wrong-sized file is a PmvisError.

        The bytes are read by Python and decoded by ``cv2.imdecode``: ``cv2.imread`` crashes the
        process on a name that is not valid UTF-8 and decodes a truncated JPEG without an error.
        """

        video = self.videos[video_id]
        path = self.checked_frame_path(video_id, frame)
        where = f"{self._where(video_id, frame)} ({path})"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PmvisError(f"{where}: cannot read frame file: {e.strerror}") from None
        if data.startswith(JPEG_SOI) and not data.rstrip(JPEG_TRAILING_PADDING).endswith(JPEG_EOI):
            raise PmvisError(f"{where}: truncated JPEG (no end-of-image marker)")
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        except cv2.error:
            image = None
        if image is None:
            raise PmvisError(f"{where}: cannot decode image (corrupt or not an image)")
        if image.shape[:2] != (video.height, video.width):
            raise PmvisError(
                f"{where}: image is {image.shape[1]}x{image.shape[0]}, "
                f"annotation file says {video.width}x{video.height}"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def read_video(self, video_id: int) -> np.ndarray:
        """All frames of a video, (T, H, W, 3) RGB uint8."""
        return np.stack([self.read_frame(video_id, t) for t in range(self.videos[video_id].length)])


# ----------------------------------------------------------------------------- validation


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One predicted track: the YTVIS results format, masks normalised to compressed RLE."""

    video_id: int
    category_id: int
    score: float
    segmentations: list[Rle | None]

    def to_json(self) -> dict[str, Any]:
        return {"video_id": self.video_id, "category_id": self.category_id, "score": self.score,
                "segmentations": self.segmentations}


ANNOTATIONS_FILENAME = "annotations.json"
# The other files of a dataset directory as `pmvis synth` writes it (read by `pmvis report`).
TRUTH_FILENAME = "truth.json"
DEFECTS_FILENAME = "defects.json"
DATASET_FILENAMES = (ANNOTATIONS_FILENAME, TRUTH_FILENAME, DEFECTS_FILENAME)


