"""Loss and mask kernels (torch reference paths and fused GPU paths).

* :func:`rgb_to_lab` — sRGB → CIE LAB (D65, 2°) on the device, as skimage's ``rgb2lab``.
* :func:`projection_loss`, :func:`pairwise_loss`, :func:`warmup_factor` — BoxInst (DESIGN §4.1).
* :func:`tk_affinity`, :func:`tk_loss`, :class:`TKAffinity` — TK-Loss with once-per-clip matches (§4.2).
* :func:`pseudo_mask_loss` — PM-VIS focal + dice supervision by pseudo masks.

``pairwise_loss`` and ``tk_loss`` run fused Triton kernels on CUDA tensors (``backend="auto"``) and
the torch path elsewhere; triton is imported only then.
"""

from .boxinst import pairwise_loss, projection_loss, warmup_factor
from .lab import rgb_to_lab
from .pseudo import pseudo_mask_loss
from .tk import TKAffinity, default_pairs, tk_affinity, tk_loss

__all__ = [
    "TKAffinity", "default_pairs", "pairwise_loss", "projection_loss", "pseudo_mask_loss",
    "rgb_to_lab", "tk_affinity", "tk_loss", "warmup_factor",
]
