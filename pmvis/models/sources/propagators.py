"""Mask propagation engines for the ``track`` source: SAM 2's video predictor and a weight-free
optical-flow propagator (:mod:`pmvis.models.sources.deaot` adds DeAOT). Each carries a group of
masks from their common key frame forward and backward through a video; the engines' exact rules
are in :mod:`pmvis.models.sources.propagate`'s docstring.
"""

from __future__ import annotations

import math
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from unittest import mock

import cv2
import numpy as np

from pmvis.core.errors import PmvisError
from pmvis.models.sources._common import clip01, log, warn_random_weights
from pmvis.models.sources.base import (
    Box,
)
from pmvis.models.torch_files import load_state_dict_strict, load_torch_file, state_dict_from

if TYPE_CHECKING:
    from pmvis.models.sources.propagate import PropagationConfig

_SAM2_FEED_LOCK = threading.Lock()
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
_OUTSIDE_FLOW = 1e6  # flow looked up outside the frame: never within any fb tolerance
# Template matching: added to the mean squared RGB difference per pixel moved², so only near-ties
# (a plain object on a plain region) prefer the shorter move (a 40 px move costs 16 of 65,025).
_MOVE_PENALTY = 0.01


class MaskPropagator(Protocol):
    def propagate(self, frames: np.ndarray, groups: list[tuple[int, dict[int, np.ndarray]]]
              ) -> dict[int, tuple[list[np.ndarray | None], list[float | None]]]: ...


class Sam2LazyFrames:
    """Frames preprocessed on access exactly as SAM 2's JPEG loader does (``_load_img_as_tensor``)."""

    def __init__(self, frames: np.ndarray, image_size: int):
        self.frames = frames
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        img = np.array(Image.fromarray(self.frames[index]).resize((self.image_size, self.image_size))) / 255.0
        img = torch.from_numpy(img).permute(2, 0, 1).float()
        mean = torch.tensor(_IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(_IMAGENET_STD, dtype=torch.float32)[:, None, None]
        return (img - mean) / std


def sam2_init_state(predictor, frames: np.ndarray, feed: str = "memory") -> dict:
    """SAM 2's ``init_state`` for in-memory RGB frames (see the module docstring for the two feeds)."""
    import sam2.sam2_video_predictor as svp

    T, H, W = frames.shape[:3]
    if feed == "jpeg":
        with tempfile.TemporaryDirectory(prefix="pmvis-sam2-") as tmp:
            for t in range(T):
                path = str(Path(tmp) / f"{t:05d}.jpg")
                if not cv2.imwrite(path, np.ascontiguousarray(frames[t][..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 100]):
                    raise OSError(f"cv2 could not write {path}")
            return predictor.init_state(video_path=tmp, offload_video_to_cpu=True)
    if not hasattr(svp, "load_video_frames"):
        raise PmvisError("this sam2 version has no sam2_video_predictor.load_video_frames hook: "
                         "use frame_feed: jpeg")
    lazy = Sam2LazyFrames(frames, predictor.image_size)

    def from_memory(video_path, image_size, **_):
        if image_size != lazy.image_size:
            raise RuntimeError(f"sam2 asked for {image_size}² frames, prepared {lazy.image_size}²")
        return lazy, H, W

    with _SAM2_FEED_LOCK, mock.patch.object(svp, "load_video_frames", from_memory):
        return predictor.init_state(video_path="<pmvis in-memory frames>", offload_video_to_cpu=True)


def build_sam2_predictor(config_name: str, checkpoint: str | None, *, device: str = "cpu",
                         random_init_seed: int = 0, overrides: list[str] | None = None):
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    what = f"SAM 2 ({config_name})"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed)
        try:
            predictor = build_sam2_video_predictor(config_name, ckpt_path=None, device="cpu",
                                                   hydra_overrides_extra=list(overrides or []))
        except Exception as e:  # hydra: MissingConfigException, ConfigCompositionException...
            if type(e).__module__.startswith(("hydra", "omegaconf")):
                raise PmvisError(f"sam2_config {config_name!r}: not a usable sam2 config "
                                 f"(e.g. configs/sam2.1/sam2.1_hiera_t.yaml): {e}") from None
            raise
    if checkpoint is None:
        warn_random_weights(what)
    else:
        loaded = load_torch_file(checkpoint, f"{what} checkpoint")
        state = state_dict_from(loaded, checkpoint, f"{what} checkpoint", keys=("model",))
        load_state_dict_strict(predictor, state, checkpoint, f"{what} checkpoint")
        log.info("%s: loaded weights from %s", what, checkpoint)
    predictor.fill_hole_area = 0  # needs sam2's CUDA extension, which this project does not build
    return predictor.to(device).eval()


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for large |x|


class Sam2Propagator:
    def __init__(self, config: PropagationConfig, device: str):
        self.predictor = build_sam2_predictor(config.sam2_config, config.checkpoint, device=device,
                                              random_init_seed=config.random_init_seed,
                                              overrides=config.sam2_overrides)
        self.feed = config.frame_feed

    @staticmethod
    def _object_score(state: dict, obj_idx: int, t: int) -> float:
        outputs = state["output_dict_per_obj"][obj_idx]
        out = outputs["cond_frame_outputs"].get(t) or outputs["non_cond_frame_outputs"].get(t)
        return float(out["object_score_logits"].float().reshape(-1)[0])

    def propagate(self, frames: np.ndarray, groups: list[tuple[int, dict[int, np.ndarray]]]
              ) -> dict[int, tuple[list[np.ndarray | None], list[float | None]]]:
        import torch

        T = len(frames)
        results: dict[int, tuple[list, list]] = {}
        if not groups:
            return results
        import sam2.sam2_video_predictor as svp
        from tqdm import tqdm

        p = self.predictor
        # SAM 2 draws a tqdm bar per propagation, with no switch: on Ray every actor's bars flood
        # the driver's log (pmvis shows one bar per source on the driver instead).
        quiet = mock.patch.object(svp, "tqdm", lambda it, *a, **k: tqdm(it, *a, **{**k, "disable": True}))
        with torch.inference_mode(), quiet:
            state = sam2_init_state(p, frames, self.feed)
            for key, objects in groups:
                p.reset_state(state)
                for oid, mask in objects.items():
                    p.add_new_mask(state, frame_idx=key, obj_id=oid, mask=mask)
                masks = {oid: [None] * T for oid in objects}
                confs = {oid: [None] * T for oid in objects}
                done: set[int] = set()
                for reverse in (False, True):
                    for t, obj_ids, logits in p.propagate_in_video(state, start_frame_idx=key, reverse=reverse):
                        if t in done:  # the key frame comes out of both passes
                            continue
                        done.add(t)
                        for i, oid in enumerate(obj_ids):
                            score = self._object_score(state, i, t)
                            if t == key:  # the seed itself, not its copy resampled to the model's grid
                                masks[oid][t], confs[oid][t] = objects[oid].astype(bool), _sigmoid(score)
                                continue
                            if score <= 0:
                                continue
                            m = (logits[i, 0] > 0).cpu().numpy()
                            if m.any():
                                masks[oid][t], confs[oid][t] = m, _sigmoid(score)
                for oid in objects:
                    results[oid] = (masks[oid], confs[oid])
            p.reset_state(state)
        return results


def box_agreement(mask: np.ndarray, box: Box | None) -> float:
    """IoU of the mask's tight box with the GT box ``[x, y, w, h]``; 1.0 where the frame has no box."""
    if box is None:
        return 1.0
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    mx0, my0, mx1, my1 = float(xs.min()), float(ys.min()), float(xs.max()) + 1.0, float(ys.max()) + 1.0
    bx0, by0, bx1, by1 = float(box[0]), float(box[1]), float(box[0]) + float(box[2]), float(box[1]) + float(box[3])
    iw = max(0.0, min(mx1, bx1) - max(mx0, bx0))
    ih = max(0.0, min(my1, by1) - max(my0, by0))
    inter = iw * ih
    union = (mx1 - mx0) * (my1 - my0) + max(bx1 - bx0, 0.0) * max(by1 - by0, 0.0) - inter
    return inter / union if union > 0 else 0.0


def clip_to_box(mask: np.ndarray, box: Box | None, margin: int) -> np.ndarray:
    """``mask`` without its pixels outside the GT box ``[x, y, w, h]`` grown by ``margin`` px (a
    frame without a box: unchanged). The boxes are the user's labels: flow drift beyond them is
    wrong by definition, and cutting it keeps the next step from carrying it on."""
    if box is None:
        return mask
    H, W = mask.shape
    x0, y0 = max(int(math.floor(box[0])) - margin, 0), max(int(math.floor(box[1])) - margin, 0)
    x1 = min(int(math.ceil(box[0] + box[2])) + margin, W)
    y1 = min(int(math.ceil(box[1] + box[3])) + margin, H)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


class FlowPropagator:
    """Weight-free ``flow`` engine: dense DIS optical flow carries each key mask frame to frame.

    See the module docstring for the propagation and the confidence. Objects are propagated
    independently (the flows are shared: each frame pair's two flows are computed once per video).
    """

    uses_boxes = True  # PropagationSource passes the GT boxes: they enter the confidence

    def __init__(self, config: PropagationConfig):
        self.preset = _DIS_PRESETS[config.flow_preset]
        self.fb_tolerance = float(config.flow_fb_tolerance)
        self.present_threshold = float(config.flow_present_threshold)
        self.bins = int(config.flow_appearance_bins)
        self.box_margin = int(config.flow_box_margin)
        self.search = float(config.flow_search)

    def _histogram(self, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
        h = cv2.calcHist([frame], [0, 1, 2], mask.astype(np.uint8), [self.bins] * 3, [0, 256] * 3)
        return h / max(float(h.sum()), 1.0)

    def _displacement(self, frame: np.ndarray, nxt: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
        """(dx, dy) that best moves ``mask``'s pixels of ``frame`` onto ``nxt``: the least mean
        squared RGB difference over the mask (``cv2.matchTemplate``, ``TM_SQDIFF`` with the mask)
        within ``flow_search`` object sizes; near-ties go to the smaller move."""
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        H, W = mask.shape
        reach = int(math.ceil(self.search * max(x1 - x0, y1 - y0)))
        sx0, sy0, sx1, sy1 = max(x0 - reach, 0), max(y0 - reach, 0), min(x1 + reach, W), min(y1 + reach, H)
        template = np.ascontiguousarray(frame[y0:y1, x0:x1])
        cost = cv2.matchTemplate(np.ascontiguousarray(nxt[sy0:sy1, sx0:sx1]), template, cv2.TM_SQDIFF,
                                 mask=np.ascontiguousarray(mask[y0:y1, x0:x1]).astype(np.uint8))
        dy, dx = np.mgrid[0:cost.shape[0], 0:cost.shape[1]]
        dx, dy = dx + (sx0 - x0), dy + (sy0 - y0)
        cost = cost / (3.0 * len(xs)) + _MOVE_PENALTY * (dx * dx + dy * dy)
        i = np.unravel_index(int(np.argmin(cost)), cost.shape)
        return int(dx[i]), int(dy[i])

    def _moved(self, frame: np.ndarray, nxt: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
        """``mask`` translated by its :meth:`_displacement` to ``nxt``, and whether matching back
        from ``nxt`` returns it to within ``flow_fb_tolerance`` px (the template-matching analogue
        of the flow's forward–backward check; an absent object's best match rarely maps back)."""
        dx, dy = self._displacement(frame, nxt, mask)
        H, W = mask.shape
        moved = cv2.warpAffine(mask.astype(np.uint8), np.float32([[1, 0, dx], [0, 1, dy]]), (W, H),
                               flags=cv2.INTER_NEAREST) > 0
        if not moved.any():
            return moved, False
        bx, by = self._displacement(nxt, frame, moved)
        return moved, math.hypot(bx + dx, by + dy) <= max(self.fb_tolerance, 1.0)

    def _step(self, prev: np.ndarray, back: np.ndarray, fwd: np.ndarray, gx: np.ndarray, gy: np.ndarray,
              reach: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Warp ``prev`` (bool) to the next frame: (new mask, fb-consistent fraction, surviving fraction).

        ``back``: flow next → prev (each new pixel looks up where it came from); ``fwd``: prev → next.
        """
        mx, my = gx + back[..., 0], gy + back[..., 1]
        new = cv2.remap(prev.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=0) >= 0.5
        if not new.any():
            return new, 0.0, 0.0
        f_at = cv2.remap(fwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(_OUTSIDE_FLOW, _OUTSIDE_FLOW))
        err2 = (back[..., 0] + f_at[..., 0]) ** 2 + (back[..., 1] + f_at[..., 1]) ** 2
        fb = float(np.mean(err2[new] <= self.fb_tolerance ** 2))
        near_new = cv2.dilate(new.astype(np.uint8), reach)
        landed = cv2.remap(near_new, gx + fwd[..., 0], gy + fwd[..., 1], cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        survived = float(np.mean(landed[prev] > 0))
        return new, fb, survived

    def propagate(self, frames: np.ndarray, groups: list[tuple[int, dict[int, np.ndarray]]],
              boxes: dict[int, list[Box | None]] | None = None
              ) -> dict[int, tuple[list[np.ndarray | None], list[float | None]]]:
        T, H, W = frames.shape[:3]
        boxes = boxes or {}
        results: dict[int, tuple[list, list]] = {}
        if not groups:
            return results
        dis = cv2.DISOpticalFlow_create(self.preset)
        gray: dict[int, np.ndarray] = {}
        flows: dict[tuple[int, int], np.ndarray] = {}

        def gray_of(t: int) -> np.ndarray:
            if t not in gray:
                gray[t] = cv2.cvtColor(np.ascontiguousarray(frames[t]), cv2.COLOR_RGB2GRAY)
            return gray[t]

        def flow(a: int, b: int) -> np.ndarray:  # (H, W, 2) with I_a(p) ≈ I_b(p + flow(p))
            if (a, b) not in flows:
                flows[(a, b)] = dis.calc(gray_of(a), gray_of(b), None)
            return flows[(a, b)]

        gy, gx = np.mgrid[0:H, 0:W].astype(np.float32)
        r = max(int(math.ceil(self.fb_tolerance)), 0)
        reach = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        for key, objects in groups:
            for oid, seed in objects.items():
                seed = np.asarray(seed, dtype=bool)
                own_boxes = boxes.get(oid) or [None] * T
                masks: list[np.ndarray | None] = [None] * T
                confs: list[float | None] = [None] * T
                masks[key], confs[key] = seed, box_agreement(seed, own_boxes[key])
                key_hist = self._histogram(frames[key], seed)

                def appearance(n: int, mask: np.ndarray) -> float:
                    return float(cv2.compareHist(key_hist, self._histogram(frames[n], mask), cv2.HISTCMP_INTERSECT))

                for step in (1, -1):
                    prev, t = seed, key
                    while 0 <= t + step < T:
                        n = t + step
                        new, fb, survived = self._step(prev, flow(n, t), flow(t, n), gx, gy, reach)
                        new = clip_to_box(new, own_boxes[n], self.box_margin)
                        tracked = fb * survived * appearance(n, new) if new.any() else 0.0
                        if self.search > 0:  # the whole mask moved by template matching, if it explains more
                            moved, consistent = self._moved(frames[t], frames[n], prev)
                            moved = clip_to_box(moved, own_boxes[n], self.box_margin)
                            if consistent and moved.any():
                                score = appearance(n, moved)
                                if score > tracked:
                                    new, tracked = moved, score
                        if not new.any():
                            break
                        if tracked < self.present_threshold:
                            break  # lost: the flow no longer carries it, or it no longer looks like itself
                        conf = clip01(tracked * box_agreement(new, own_boxes[n]))
                        if conf >= self.present_threshold:
                            masks[n], confs[n] = new, conf
                        prev, t = new, n
                results[oid] = (masks, confs)
        return results
