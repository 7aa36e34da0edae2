"""Synthetic scenes: textured shapes that move, scale, turn, cross and occlude each other over a
noisy background, rendered frame by frame with their exact per-frame masks (:func:`render_video`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from pydantic import Field, model_validator

from pmvis.core.config import StrictConfig
from pmvis.core.errors import PmvisError

CATEGORIES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross")
# Attempts to resample an object that is never visible before giving up on the config.
_MAX_PLACEMENT_ATTEMPTS = 100


class SynthConfig(StrictConfig):
    """Every knob of the synthetic dataset; sizes and speeds are fractions of min(height, width)."""

    videos: int = Field(8, ge=1, le=100_000)
    frames: int = Field(10, ge=1, le=10_000)
    height: int = Field(120, ge=32, le=4096)
    width: int = Field(160, ge=32, le=4096)
    seed: int = Field(0, ge=0)
    min_objects: int = Field(1, ge=1, le=20)
    max_objects: int = Field(3, ge=1, le=20)
    min_size: float = Field(0.10, gt=0, le=1, description="object diameter / min(H, W), lower bound")
    max_size: float = Field(0.35, gt=0, le=1, description="object diameter / min(H, W), upper bound")
    max_speed: float = Field(0.035, ge=0, le=1, description="pixels per frame / min(H, W)")
    max_scale_rate: float = Field(0.03, ge=0, le=0.5, description="|d log(scale) / frame|")
    max_rotation: float = Field(0.15, ge=0, le=math.pi, description="radians per frame")
    cross_rate: float = Field(0.35, ge=0, le=1, description="P(object enters or leaves the frame)")
    occlusion_rate: float = Field(0.5, ge=0, le=1, description="P(object is aimed at an earlier one)")
    min_visible_pixels: int = Field(16, ge=1, description="fewer visible pixels -> null entry")
    noise: float = Field(4.0, ge=0, le=100, description="per-frame pixel noise std (0-255 scale)")
    inaccurate_rate: float = Field(0.08, ge=0, le=1, description="per visible (annotation, frame)")
    missing_rate: float = Field(0.04, ge=0, le=1, description="per visible (annotation, frame)")
    inaccurate_max_iou: float = Field(0.9, gt=0, lt=1, description="an inaccurate mask's max IoU with truth")
    jpeg_quality: int = Field(95, ge=1, le=100)

    @model_validator(mode="after")
    def _check_ranges(self) -> "SynthConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) > max_size ({self.max_size})")
        if self.inaccurate_rate + self.missing_rate > 1:
            raise ValueError("inaccurate_rate + missing_rate must be <= 1")
        return self


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = np.ones(u.shape, bool)
    for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6):  # edge normals; inradius 0.5
        inside &= u * math.cos(a) + v * math.sin(a) <= 0.5
    return inside


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.3)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.7,
    "triangle": _triangle,
    "ring": _ring,
    "cross": _cross,
}

# Pattern weight in [0, 1] mixing the object's two palette colours; moves/rotates with the object.
_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray, "_Object"], np.ndarray]] = {
    "disc": lambda u, v, o: (np.sin(o.freq * (u * math.cos(o.phase) + v * math.sin(o.phase))) > 0) * 1.0,
    "square": lambda u, v, o: (np.floor((u + 1) * o.freq / 2) + np.floor((v + 1) * o.freq / 2)) % 2,
    "triangle": lambda u, v, o: o.speckle[
        np.clip(((v + 1) / 2 * len(o.speckle)).astype(int), 0, len(o.speckle) - 1),
        np.clip(((u + 1) / 2 * len(o.speckle)).astype(int), 0, len(o.speckle) - 1),
    ],
    "ring": lambda u, v, o: 0.5 + 0.5 * np.cos(np.arctan2(v, u) - o.phase),
    "cross": lambda u, v, o: (np.cos(math.pi * o.freq * u) * np.cos(math.pi * o.freq * v) > 0.4) * 1.0,
}

_PALETTES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {  # RGB
    "disc": ((200, 30, 30), (245, 150, 40)),
    "square": ((30, 50, 190), (80, 210, 235)),
    "triangle": ((20, 110, 40), (140, 230, 110)),
    "ring": ((110, 30, 150), (245, 120, 200)),
    "cross": ((240, 215, 30), (90, 50, 20)),
}


@dataclass
class _Object:
    category: int  # index into CATEGORIES
    radius: float  # nominal radius in pixels (scale 1)
    pos: np.ndarray  # (T, 2) centre x, y in pixels
    scale: np.ndarray  # (T,)
    angle: np.ndarray  # (T,) radians
    colours: np.ndarray  # (2, 3) RGB float
    freq: float
    phase: float
    speckle: np.ndarray  # (16, 16) in [0, 1]

    def local(self, t: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates -> object-local (u, v) at frame t."""
        dx, dy = x - self.pos[t, 0], y - self.pos[t, 1]
        c, s, k = math.cos(self.angle[t]), math.sin(self.angle[t]), 1.0 / (self.radius * self.scale[t])
        return (c * dx + s * dy) * k, (-s * dx + c * dy) * k


@dataclass
class SynthVideo:
    """One rendered video: frames plus per-object full (in-image) shapes and visible masks."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    categories: list[int]  # per object, category id (1-based)
    shapes: np.ndarray  # (N, T, H, W) bool: the whole object, clipped to the image
    visible: np.ndarray  # (N, T, H, W) bool: shape minus the shapes drawn above it
    present: np.ndarray  # (N, T) bool: visible area >= min_visible_pixels (non-null entry)


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random clutter colour; half the time an object palette colour, to defeat colour thresholds."""
    if rng.random() < 0.5:
        pal = _PALETTES[CATEGORIES[rng.integers(len(CATEGORIES))]][rng.integers(2)]
        c = np.clip(np.array(pal) + rng.uniform(-25, 25, 3), 0, 255)
    else:
        c = rng.uniform(0, 255, 3)
    return tuple(float(x) for x in c)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    m = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    g = xx * math.cos(a) + yy * math.sin(a)
    g = ((g - g.min()) / (np.ptp(g) + 1e-6))[..., None]
    ca, cb = rng.uniform(30, 225, (2, 3)).astype(np.float32)
    img = ca * (1 - g) + cb * g
    low = rng.normal(0, 35, (max(2, h // 12), max(2, w // 12), 3)).astype(np.float32)
    img = np.clip(img + cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 7)):
        p1 = (int(rng.integers(w)), int(rng.integers(h)))
        p2 = (int(rng.integers(w)), int(rng.integers(h)))
        cv2.line(img, p1, p2, _colour(rng), int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(rng.integers(2, 5)):
        centre = (int(rng.integers(w)), int(rng.integers(h)))
        axes = tuple(int(x) for x in rng.uniform(0.03, 0.12, 2) * m + 1)
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, _colour(rng), -1, cv2.LINE_AA)
    return img


def _sample_object(rng: np.random.Generator, cfg: SynthConfig, earlier: list[_Object]) -> _Object:
    """Category, size and a trajectory: free, entering/leaving the frame, or aimed at an earlier object."""
    h, w, n_t = cfg.height, cfg.width, cfg.frames
    m = min(h, w)
    t = np.arange(n_t, dtype=np.float64)
    cat = int(rng.integers(len(CATEGORIES)))
    radius = rng.uniform(cfg.min_size, cfg.max_size) * m / 2
    scale = np.exp(rng.uniform(-cfg.max_scale_rate, cfg.max_scale_rate) * (t - rng.integers(n_t)))
    angle = rng.uniform(0, 2 * math.pi) + rng.uniform(-cfg.max_rotation, cfg.max_rotation) * t
    heading = rng.uniform(0, 2 * math.pi)
    vel = rng.uniform(0.2, 1.0) * cfg.max_speed * m * np.array([math.cos(heading), math.sin(heading)])
    if n_t >= 3 and rng.random() < cfg.cross_rate:
        # Fully outside one edge at the first (entering) or last (leaving) frame, inside at t_in.
        entering = rng.random() < 0.5
        t_out = 0 if entering else n_t - 1
        t_in = int(rng.integers(1, n_t)) if entering else int(rng.integers(0, n_t - 1))
        edge = int(rng.integers(4))  # left, right, top, bottom
        axis, far = (0 if edge < 2 else 1), edge in (1, 3)
        dim, odim = (w, h) if axis == 0 else (h, w)
        r_in, r_out = radius * scale[t_in], radius * scale[t_out]
        depth = rng.uniform(r_in, max(r_in, 0.5 * dim))
        par = rng.uniform(min(r_in, odim / 2), max(odim - r_in, odim / 2))
        p_in, p_out = np.zeros(2), np.zeros(2)
        p_in[axis] = dim - depth if far else depth
        p_out[axis] = dim + r_out + 1 if far else -(r_out + 1)
        p_in[1 - axis] = par
        p_out[1 - axis] = par + rng.uniform(-0.3, 0.3) * odim
        vel = (p_in - p_out) / (t_in - t_out)
        pos = p_out + vel * (t - t_out)[:, None]
    elif earlier and rng.random() < cfg.occlusion_rate:
        target = earlier[int(rng.integers(len(earlier)))]
        t_meet = int(rng.integers(n_t))
        offset = rng.uniform(-0.3, 0.3, 2) * (radius + target.radius)
        pos = target.pos[t_meet] + offset + vel * (t - t_meet)[:, None]
    else:
        x0 = rng.uniform(radius, max(radius, w - radius))
        y0 = rng.uniform(radius, max(radius, h - radius))
        p0 = np.array([x0, y0])
        pos = p0 + vel * t[:, None]
    palette = np.array(_PALETTES[CATEGORIES[cat]], np.float64)
    colours = np.clip(palette + rng.uniform(-20, 20, (2, 3)), 0, 255)
    freq = {"disc": rng.uniform(8, 12), "square": rng.uniform(3, 5), "cross": rng.uniform(1.5, 2.2)}.get(
        CATEGORIES[cat], 1.0
    )
    phase, speckle = rng.uniform(0, 2 * math.pi), rng.random((16, 16))
    return _Object(cat, radius, pos, scale, angle, colours, float(freq), phase, speckle)


def render_video(config: SynthConfig, video_index: int) -> SynthVideo:
    """Render video ``video_index`` (0-based) of the dataset ``config`` describes; deterministic."""
    cfg = config
    rng = np.random.default_rng([cfg.seed, video_index])
    h, w, n_t = cfg.height, cfg.width, cfg.frames
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[_Object] = []
    for _ in range(n):
        objects.append(_sample_object(rng, cfg, objects))

    def shape_of(o: _Object) -> np.ndarray:
        name = CATEGORIES[o.category]
        return np.stack([_SHAPES[name](*o.local(t, xs, ys)) for t in range(n_t)])

    shapes = np.stack([shape_of(o) for o in objects])
    for _ in range(_MAX_PLACEMENT_ATTEMPTS):
        visible = shapes.copy()
        covered = np.zeros((n_t, h, w), bool)
        for i in reversed(range(n)):  # top-most first
            visible[i] &= ~covered
            covered |= shapes[i]
        present = visible.sum(axis=(2, 3)) >= cfg.min_visible_pixels
        never = [i for i in range(n) if not present[i].any()]
        if not never:
            break
        for i in never:  # resample every never-visible object (its occluders stay)
            objects[i] = _sample_object(rng, cfg, objects[:i])
            shapes[i] = shape_of(objects[i])
    else:
        raise PmvisError(
            f"video {video_index + 1}: could not place {len(never)} object(s) with >= "
            f"{cfg.min_visible_pixels} visible pixels; raise min_size or lower min_visible_pixels"
        )

    background = _background(rng, h, w).astype(np.float32)
    frames = np.empty((n_t, h, w, 3), np.uint8)
    for t in range(n_t):
        img = background.copy()
        for i, o in enumerate(objects):  # back to front
            m = shapes[i, t]
            if m.any():
                u, v = o.local(t, xs[m], ys[m])
                wgt = _PATTERNS[CATEGORIES[o.category]](u, v, o)[:, None]
                img[m] = o.colours[0] * (1 - wgt) + o.colours[1] * wgt
        img += rng.normal(0, cfg.noise, img.shape).astype(np.float32)
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return SynthVideo(frames, [o.category + 1 for o in objects], shapes, visible, present)
