"""sRGB → CIE LAB (D65, 2° observer) on the tensor's device, as ``skimage.color.rgb2lab``.

The BoxInst / MaskFreeVIS references convert on the CPU with skimage (and MaskFreeVIS feeds BGR to
it); doing it here in torch keeps the images on the GPU and the channel order explicit (RGB).
"""

from __future__ import annotations

import torch

# skimage's constants (colorconv.py): sRGB primaries → XYZ, D65 2° white, CIE piecewise cube root.
SRGB_THRESHOLD = 0.04045
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
D65_WHITE = (0.95047, 1.0, 1.08883)
LAB_EPSILON = 0.008856


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` RGB in [0, 255] → ``(..., 3, H, W)`` L, a, b.

    Computed in the input's floating dtype (at least float32); integer inputs become float32.
    """
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab expects (..., 3, H, W), got {tuple(images.shape)}")
    dtype = images.dtype if images.is_floating_point() and images.element_size() >= 4 else torch.float32
    rgb = images.to(dtype) / 255.0
    linear = torch.where(rgb > SRGB_THRESHOLD, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(XYZ_FROM_RGB, dtype=dtype, device=images.device)
    white = torch.tensor(D65_WHITE, dtype=dtype, device=images.device)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear) / white[:, None, None]
    # clamp before the cube root only to keep the unused branch of torch.where finite
    f = torch.where(xyz > LAB_EPSILON, xyz.clamp(min=LAB_EPSILON) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)
