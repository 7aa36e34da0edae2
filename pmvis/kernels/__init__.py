"""Loss and mask kernels (torch reference paths and fused GPU paths) and the evaluator's RLE kernels.

* :func:`rgb_to_lab` — sRGB → CIE LAB (D65, 2°) on the device, as skimage's ``rgb2lab``.
* :func:`projection_loss`, :func:`pairwise_loss`, :func:`warmup_factor` — BoxInst (docs/design.md §4.1).
* :func:`tk_affinity`, :func:`tk_loss`, :class:`TKAffinity` — TK-Loss with once-per-clip matches (§4.2).
* :func:`pseudo_mask_loss` — PM-VIS focal + dice supervision by pseudo masks.
* :mod:`pmvis.kernels.rle` — compressed-RLE parsing and run-walk intersections (numba, no torch).

``pairwise_loss`` and ``tk_loss`` run fused Triton kernels on CUDA tensors (``backend="auto"``) and
the torch path elsewhere; triton is imported only then. The names below are imported on first use
(PEP 562), so ``pmvis.kernels.rle`` can be used without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pairwise_loss": "boxinst", "projection_loss": "boxinst", "warmup_factor": "boxinst",
    "rgb_to_lab": "lab",
    "pseudo_mask_loss": "pseudo",
    "TKAffinity": "tk", "default_pairs": "tk", "tk_affinity": "tk", "tk_loss": "tk",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
