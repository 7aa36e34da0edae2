"""DeAOT tracking engine for the ``track`` source, over a user's ``aot-benchmark`` checkout.

DeAOT is not packaged: point pmvis to a checkout of https://github.com/yoxu515/aot-benchmark with
``deaot_root`` in the track source's config or the ``PMVIS_DEAOT_ROOT`` environment variable, and
to its weights (e.g. ``R50_DeAOTL_PRE_YTB_DAV.pth``) with ``deaot_checkpoint``. Example::

    git clone https://github.com/yoxu515/aot-benchmark /opt/aot-benchmark
    export PMVIS_DEAOT_ROOT=/opt/aot-benchmark
    pmvis pseudo-masks ... --sources hqsam,track   # with  track: {engine: deaot, deaot_checkpoint: ...}

The adapter uses the engine API of the checkout (docs/design.md §4.4): ``build_vos_model``,
``build_engine(..., phase='eval')``, ``restart_engine``, ``add_reference_frame(img, label,
frame_step=0, obj_nums=[n])``, ``match_propogate_one_frame``, ``decode_current_logits``,
``update_memory``; the config is the checkout's ``configs.default.DefaultEngineConfig`` for the
model config named by ``deaot_config`` (``r50_deaotl``, ``swinb_deaotl``, ...).

Decisions (ours):

- **Weights** are loaded here, not with the checkout's ``utils.checkpoint.load_network``: that
  function calls a bare ``torch.load`` (unpickles arbitrary code) onto ``cuda:<gpu>``. We use
  ``torch.load(map_location="cpu", weights_only=True)``, accept the same layouts (``state_dict``
  or ``model`` key, or a raw state dict; a ``module.`` prefix is stripped) and check keys and
  shapes strictly. Without a checkpoint: random weights and a loud warning (tests only).
- **Input** as the checkout's evaluation transforms do: RGB / 255, ImageNet mean/std, resized
  (bicubic) so the long edge is at most ``max_long_edge`` and each side is a multiple of 16
  (16k + 1 when the model config aligns corners); labels resized with nearest neighbour.
- **One tracking pass per direction.** For a group of objects sharing a key frame, the engine is
  restarted, the key frame is added as reference (one label map, objects 1..n in the order given,
  later ones painted over earlier ones), then frames are fed forward to the end; then the same
  again backward to the start.
- **Presence and confidence.** An object is present on a frame when it wins the per-pixel
  argmax somewhere; its confidence is the mean softmax probability of its id over the pixels it
  wins (DeAOT has no object-presence head; this is the tracker's own certainty about the mask).
  On the key frame the mask is the reference mask itself, confidence 1.0.

Test: ``tests/test_sources.py::test_deaot_engine_runs`` runs only when ``PMVIS_DEAOT_ROOT`` is set::

    PMVIS_DEAOT_ROOT=/opt/aot-benchmark uv run pytest tests/test_sources.py -k deaot
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pmvis.core.errors import PmvisError
from pmvis.models.sources._common import log, warn_random_weights
from pmvis.models.torch_files import load_state_dict_strict, load_torch_file, state_dict_from

ENV_ROOT = "PMVIS_DEAOT_ROOT"
_CHECKOUT_PACKAGES = ("configs", "networks", "utils", "dataloaders")
_IMPORT_LOCK = threading.Lock()
_MEAN = np.array([0.485, 0.456, 0.406])
_STD = np.array([0.229, 0.224, 0.225])
KEY_FRAME_CONFIDENCE = 1.0


def resolve_root(root: str | None) -> Path:
    """The checkout from the config, else ``$PMVIS_DEAOT_ROOT``; a missing one is a PmvisError."""
    value = root or os.environ.get(ENV_ROOT)
    if not value:
        raise PmvisError(f"track engine 'deaot' needs an aot-benchmark checkout: set deaot_root in the track "
                         f"source's config or the {ENV_ROOT} environment variable "
                         f"(git clone https://github.com/yoxu515/aot-benchmark)")
    path = Path(value).expanduser().resolve()
    needed = [path / "networks" / "engines", path / "networks" / "models", path / "configs" / "default.py"]
    if not all(p.exists() for p in needed):
        raise PmvisError(f"{path}: not an aot-benchmark checkout (expected networks/engines, networks/models "
                         f"and configs/default.py)")
    return path


def _import_checkout(root: Path) -> dict[str, Any]:
    """Import the checkout's top-level packages (generic names: ``configs``, ``utils``...) from ``root``."""
    with _IMPORT_LOCK:
        for name in _CHECKOUT_PACKAGES:
            mod = sys.modules.get(name)
            file = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
            if mod is not None and file is not None and root not in Path(file).resolve().parents:
                raise PmvisError(f"cannot import the aot-benchmark checkout {root}: a different module "
                                 f"{name!r} ({file}) is already imported in this process")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            return {
                "models": importlib.import_module("networks.models"),
                "engines": importlib.import_module("networks.engines"),
                "config": importlib.import_module("configs.default"),
            }
        except ImportError as e:
            raise PmvisError(f"{root}: cannot import the aot-benchmark code: {e}") from None


class DeAOTPropagator:
    """Tracks groups of objects from their key-frame masks, forward and backward, with DeAOT."""

    def __init__(self, root: str | None, model_config: str = "r50_deaotl", checkpoint: str | None = None,
                 device: str = "cpu", max_long_edge: int = 1040, random_init_seed: int = 0):
        import torch

        self.root = resolve_root(root)
        mods = _import_checkout(self.root)
        try:
            cfg = mods["config"].DefaultEngineConfig("pmvis", model_config)
        except ModuleNotFoundError:
            raise PmvisError(f"{self.root}: no DeAOT model config {model_config!r} under configs/models "
                             f"(e.g. r50_deaotl, swinb_deaotl)") from None
        # Knobs some checkout versions leave out of DefaultEngineConfig (their defaults elsewhere).
        for knob, default in (("TEST_LONG_TERM_MEM_GAP", 9999), ("TEST_LONG_TERM_MEM_MAX", 9999)):
            if not hasattr(cfg, knob):
                setattr(cfg, knob, default)
        self.cfg = cfg
        self.device = torch.device(device)
        what = f"DeAOT {model_config}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_init_seed)
            model = mods["models"].build_vos_model(cfg.MODEL_VOS, cfg)
        if checkpoint is None:
            warn_random_weights(what)
        else:
            loaded = load_torch_file(checkpoint, f"{what} checkpoint")
            state = state_dict_from(loaded, checkpoint, f"{what} checkpoint", keys=("state_dict", "model"))
            state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
            load_state_dict_strict(model, state, checkpoint, f"{what} checkpoint")
            log.info("%s: loaded weights from %s", what, checkpoint)
        self.model = model.to(self.device).eval()
        gpu_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        self.engine = mods["engines"].build_engine(cfg.MODEL_ENGINE, phase="eval", aot_model=self.model,
                                                   gpu_id=gpu_id, long_term_mem_gap=cfg.TEST_LONG_TERM_MEM_GAP)
        self.max_long_edge = max_long_edge
        self.align_corners = bool(getattr(cfg, "MODEL_ALIGN_CORNERS", True))

    # -------------------------------------------------------------- input

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        scale = min(1.0, self.max_long_edge / max(height, width))
        h, w = height * scale, width * scale
        if self.align_corners:
            return int(round((h - 1) / 16)) * 16 + 1, int(round((w - 1) / 16)) * 16 + 1
        return max(int(round(h / 16)) * 16, 16), max(int(round(w / 16)) * 16, 16)

    def _image(self, frame: np.ndarray, size: tuple[int, int]):
        import torch

        img = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_CUBIC).astype(np.float64) / 255.0
        img = (img - _MEAN) / _STD
        return torch.from_numpy(img.transpose(2, 0, 1)).float()[None].to(self.device)

    def _label(self, masks: list[np.ndarray], size: tuple[int, int]):
        import torch

        label = np.zeros(masks[0].shape, np.uint8)
        for i, m in enumerate(masks, start=1):
            label[m] = i
        label = cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(label.astype(np.float32))[None, None].to(self.device)

    # -------------------------------------------------------------- tracking

    def propagate(self, frames: np.ndarray, groups: list[tuple[int, dict[int, np.ndarray]]]
              ) -> dict[int, tuple[list[np.ndarray | None], list[float | None]]]:
        import torch
        import torch.nn.functional as F

        T, H, W = frames.shape[:3]
        size = self.input_size(H, W)
        results: dict[int, tuple[list, list]] = {}
        for key, objects in groups:
            ids = list(objects)
            n = len(ids)
            masks = {oid: [None] * T for oid in ids}
            confs = {oid: [None] * T for oid in ids}
            for oid in ids:
                masks[oid][key], confs[oid][key] = objects[oid].astype(bool), KEY_FRAME_CONFIDENCE
            label = self._label([objects[oid] for oid in ids], size)
            for order in (range(key + 1, T), range(key - 1, -1, -1)):
                if len(order) == 0:
                    continue
                with torch.inference_mode():
                    self.engine.restart_engine()
                    self.engine.add_reference_frame(self._image(frames[key], size), label, frame_step=0,
                                                    obj_nums=[n])
                    for t in order:
                        self.engine.match_propogate_one_frame(self._image(frames[t], size))
                        logits = self.engine.decode_current_logits((H, W))
                        prob = torch.softmax(logits, dim=1)
                        pred = torch.argmax(prob, dim=1, keepdim=True).float()
                        self.engine.update_memory(F.interpolate(pred, size=self.engine.input_size_2d,
                                                                mode="nearest"))
                        pred_np = pred[0, 0].cpu().numpy().astype(np.int64)
                        prob_np = prob[0].float().cpu().numpy()
                        for i, oid in enumerate(ids, start=1):
                            m = pred_np == i
                            if m.any():
                                masks[oid][t] = m
                                confs[oid][t] = float(np.clip(prob_np[i][m].mean(), 0.0, 1.0))
            for oid in ids:
                results[oid] = (masks[oid], confs[oid])
        return results
