"""Weights shipped with the package (package data), each made by a documented, seeded command.

``tiny_synthetic.pt``: the tiny model (``ModelConfig.tiny``, 5 synthetic categories) pretrained
with box labels only on synthetic stills made into pseudo videos — the start point of every
training in `pmvis demo`. Made by (see :mod:`pmvis.platform.train.pretrain`)::

    pmvis pretrain --synthetic 300 --preset tiny --export pmvis/models/weights/tiny_synthetic.pt
"""

from __future__ import annotations

from pathlib import Path

from pmvis.core.errors import PmvisError

TINY_PRETRAINED = "tiny_synthetic.pt"
MAKE_COMMAND = {TINY_PRETRAINED: "pmvis pretrain --synthetic 300 --preset tiny --export pmvis/models/weights/"
                                 + TINY_PRETRAINED}


def shipped_weights(name: str) -> Path:
    """The path of a shipped weights file; a PmvisError saying how to make it when it is missing."""
    path = Path(__file__).with_name(name)
    if not path.is_file():
        how = MAKE_COMMAND.get(name, "")
        raise PmvisError(f"{path}: shipped weights are missing" + (f"; make them with: {how}" if how else ""))
    return path
