"""IDOL's online association: the memory bank of live tracks' recent embeddings and the matching of
a frame's detections to them (steps 3–5 of :mod:`pmvis.models.vis.inference`'s docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch


def memory_embedding(embeddings: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Score- and time-weighted average of a track's last n embeddings ``(n, E)`` (oldest first):
    weight_k = score_k · (k + 1) / n."""
    n = embeddings.shape[0]
    time_w = torch.arange(1, n + 1, dtype=embeddings.dtype, device=embeddings.device) / n
    w = scores.to(embeddings) * time_w
    return (w[:, None] * embeddings).sum(0) / w.sum().clamp(min=1e-12)


def bisoftmax(det_embeddings: torch.Tensor, track_embeddings: torch.Tensor) -> torch.Tensor:
    """``(N, K)``: mean of the softmax over tracks and the softmax over detections of the dot
    products of detection ``(N, E)`` and track ``(K, E)`` embeddings."""
    sim = det_embeddings.float() @ track_embeddings.float().T
    if sim.numel() == 0:
        return sim
    return 0.5 * (sim.softmax(dim=1) + sim.softmax(dim=0))


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


class MemoryBank:
    """The live tracks' recent embeddings; tracks leave after ``max_missed`` + 1 consecutive misses."""

    def __init__(self, memory_length: int = 3, max_missed: int = 10) -> None:
        self.memory_length = memory_length
        self.max_missed = max_missed
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
        return torch.stack([memory_embedding(torch.stack(m.embeddings), torch.tensor(m.scores))
                            for m in self.entries.values()])

    def add(self, track_id: int, embedding: torch.Tensor, score: float) -> None:
        """Record a detection of ``track_id`` (a new track or a match): resets its miss count."""
        m = self.entries.setdefault(track_id, _Memory([], []))
        m.embeddings = (m.embeddings + [embedding.detach().float()])[-self.memory_length:]
        m.scores = (m.scores + [float(score)])[-self.memory_length:]
        m.missed = 0

    def miss(self, track_ids: Iterable[int]) -> list[int]:
        """Count a miss for each of ``track_ids``; returns the ids dropped from the bank."""
        dropped = []
        for tid in track_ids:
            m = self.entries[tid]
            m.missed += 1
            if m.missed > self.max_missed:
                del self.entries[tid]
                dropped.append(tid)
        return dropped


class MemoryBankTracker:
    """Online association of per-frame detections to tracks (steps 3–5 of the module doc)."""

    def __init__(self, cfg: Any) -> None:
        """``cfg``: an :class:`~pmvis.models.vis.inference.InferenceConfig` (``memory_length``,
        ``max_missed``, ``match_threshold``, ``new_track_score``)."""
        self.cfg = cfg
        self.bank = MemoryBank(cfg.memory_length, cfg.max_missed)
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
            for i, j in associate(bisoftmax(embeddings, memory.to(embeddings.device)), self.cfg.match_threshold):
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
