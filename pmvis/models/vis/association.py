"""IDOL's online association: the memory bank of live tracks' recent embeddings and the matching of
a frame's detections to them (steps 3–5 of :mod:`pmvis.models.vis.inference`'s docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch


def memory_embedding(embeddings: torch.Tensor, scores: torch.Tensor, temporal: str = "add") -> torch.Tensor:
    """Weighted average of a track's last n embeddings ``(n, E)`` (oldest first) with per-entry
    detection scores s_k and temporal weights τ_k = (k + 1) / n (oldest 1/n … newest 1): IDOL's
    ``long_match`` memory, weight_k = s_k + τ_k (``temporal="add"``, VNext ``tracker.py``); pmvis's
    first rule was weight_k = s_k · τ_k (``"multiply"``)."""
    n = embeddings.shape[0]
    time_w = torch.arange(1, n + 1, dtype=embeddings.dtype, device=embeddings.device) / n
    s = scores.to(embeddings)
    w = s + time_w if temporal == "add" else s * time_w
    return (w[:, None] * embeddings).sum(0) / w.sum().clamp(min=1e-12)


def bisoftmax(det_embeddings: torch.Tensor, track_embeddings: torch.Tensor) -> torch.Tensor:
    """``(N, K)``: mean of the softmax over tracks and the softmax over detections of the dot
    products of detection ``(N, E)`` and track ``(K, E)`` embeddings."""
    sim = det_embeddings.float() @ track_embeddings.float().T
    if sim.numel() == 0:
        return sim
    return 0.5 * (sim.softmax(dim=1) + sim.softmax(dim=0))


def associate_in_order(scores: torch.Tensor, threshold: float, exist_frames: torch.Tensor | None = None,
                       ) -> list[tuple[int, int]]:
    """IDOL's matching (VNext ``IDOL_Tracker.match``): detections in their order (descending score)
    each take their best remaining track if its score exceeds ``threshold``; a taken track's column is
    zeroed. Frame weighting (``exist_frames``, each track's number of matched frames, None: off):
    when more than one track scores above ``threshold`` for a detection, candidate tracks' scores are
    multiplied by their frame counts and the others' by the candidates' mean count before the argmax
    and the threshold test — an established track wins over a young look-alike."""
    s = scores.detach().float().cpu().clone()
    pairs: list[tuple[int, int]] = []
    if s.numel() == 0:
        return pairs
    frames = None if exist_frames is None else exist_frames.detach().float().cpu()
    for i in range(s.shape[0]):
        row = s[i]
        candidates = row > threshold
        if frames is not None and int(candidates.sum()) > 1:
            row = torch.where(candidates, row * frames, row * frames[candidates].mean())
        value, j = row.max(0)
        if float(value) > threshold:
            pairs.append((i, int(j)))
            s[:, int(j)] = 0.0
    return pairs


def associate(scores: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Greedy mutual-best matching of a ``(N, K)`` score matrix: take the highest remaining entry
    while it exceeds ``threshold``, removing its row and column. Returns (detection, track) pairs."""
    s = scores.detach().float().cpu().clone()
    pairs: list[tuple[int, int]] = []
    if s.numel() == 0:
        return pairs
    k = s.shape[1]
    for _ in range(min(s.shape)):
        value, flat = s.flatten().max(0)
        if not value > threshold:
            break
        i, j = divmod(int(flat), k)
        pairs.append((i, j))
        s[i, :] = -math.inf
        s[:, j] = -math.inf
    return pairs


@dataclass
class _Memory:
    embeddings: list[torch.Tensor]
    scores: list[float]
    missed: int = 0
    frames: int = 0  # frames matched (or created) so far: IDOL's exist_frame


class MemoryBank:
    """The live tracks' recent embeddings; a track leaves after ``max_missed`` consecutive misses
    (IDOL: a tracklet unmatched for ``memo_tracklet_frames`` = 10 frames is removed)."""

    def __init__(self, memory_length: int = 3, max_missed: int = 10, temporal: str = "add") -> None:
        self.memory_length = memory_length
        self.max_missed = max_missed
        self.temporal = temporal
        self.entries: dict[int, _Memory] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def track_ids(self) -> list[int]:
        return list(self.entries)

    def embeddings(self) -> torch.Tensor | None:
        """``(K, E)`` memory embeddings in :attr:`track_ids` order (None when empty)."""
        if not self.entries:
            return None
        return torch.stack([memory_embedding(torch.stack(m.embeddings), torch.tensor(m.scores), self.temporal)
                            for m in self.entries.values()])

    def exist_frames(self) -> torch.Tensor:
        """``(K,)`` matched-frame counts in :attr:`track_ids` order."""
        return torch.tensor([float(m.frames) for m in self.entries.values()])

    def add(self, track_id: int, embedding: torch.Tensor, score: float) -> None:
        """Record a detection of ``track_id`` (a new track or a match): resets its miss count."""
        m = self.entries.setdefault(track_id, _Memory([], []))
        m.embeddings = (m.embeddings + [embedding.detach().float()])[-self.memory_length:]
        m.scores = (m.scores + [float(score)])[-self.memory_length:]
        m.missed = 0
        m.frames += 1

    def miss(self, track_ids: Iterable[int]) -> list[int]:
        """Count a miss for each of ``track_ids``; returns the ids dropped from the bank."""
        dropped = []
        for tid in track_ids:
            m = self.entries[tid]
            m.missed += 1
            if m.missed >= self.max_missed:
                del self.entries[tid]
                dropped.append(tid)
        return dropped


class MemoryBankTracker:
    """Online association of per-frame detections to tracks (steps 3–5 of the module doc)."""

    def __init__(self, cfg: Any) -> None:
        """``cfg``: an :class:`~pmvis.models.vis.inference.InferenceConfig` (``memory_length``,
        ``max_missed``, ``temporal_weighting``, ``association``, ``frame_weighting``,
        ``match_threshold``, ``new_track_score``)."""
        self.cfg = cfg
        self.bank = MemoryBank(cfg.memory_length, cfg.max_missed, cfg.temporal_weighting)
        self.next_id = 0

    def step(self, embeddings: torch.Tensor, scores: torch.Tensor) -> list[int | None]:
        """Detections of one frame (``(N, E)`` embeddings, ``(N,)`` scores) → their track ids
        (``None``: discarded — unmatched and not confident enough for a new track)."""
        n = embeddings.shape[0]
        ids: list[int | None] = [None] * n
        track_ids = self.bank.track_ids
        matched_tracks: set[int] = set()
        memory = self.bank.embeddings()
        if memory is not None and n:
            scores_ij = bisoftmax(embeddings, memory.to(embeddings.device))
            if self.cfg.association == "idol":
                frames = self.bank.exist_frames() if self.cfg.frame_weighting else None
                pairs = associate_in_order(scores_ij, self.cfg.match_threshold, frames)
            else:
                pairs = associate(scores_ij, self.cfg.match_threshold)
            for i, j in pairs:
                ids[i] = track_ids[j]
                matched_tracks.add(track_ids[j])
        for i in range(n):
            if ids[i] is None and float(scores[i]) > self.cfg.new_track_score:
                ids[i] = self.next_id
                self.next_id += 1
        for i, tid in enumerate(ids):
            if tid is not None:
                self.bank.add(tid, embeddings[i], float(scores[i]))
        self.bank.miss([t for t in track_ids if t not in matched_tracks])
        return ids
