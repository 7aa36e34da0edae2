"""Torch device choice in one place: config strings in, a checked device out."""

from __future__ import annotations

from pmvis.core.errors import PmvisError


def check_device(device: str):
    """A torch device from a config string; CUDA asked for on a machine without it is a PmvisError
    (not a crash deep in torch)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise PmvisError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PmvisError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


def resolve_device(device: str | None, num_gpus: float) -> str:
    """``None`` → ``"cuda"`` when the worker was given GPUs and CUDA is available, else ``"cpu"``."""
    import torch

    if device is None:
        return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    check_device(device)
    return device
