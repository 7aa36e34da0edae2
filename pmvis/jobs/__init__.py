"""One module per user command; each is thin: parse arguments, call the platform, report.

The flags several commands share are declared here once, so they read the same everywhere. A
command module never imports another (import-linter contract in pyproject.toml).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data DIR`` and ``--annotations FILE``: the dataset a command reads."""
    parser.add_argument("--data", required=True, type=Path, metavar="DIR",
                        help="dataset directory (annotations.json + JPEGImages/)")
    parser.add_argument("--annotations", type=Path, metavar="FILE",
                        help="annotation file to use instead of DIR/annotations.json (relative to DIR or absolute)")


def add_pseudo_masks_argument(parser: argparse.ArgumentParser) -> None:
    """``--pseudo-masks OUT``: the output of `pmvis pseudo-masks`, whose store is OUT/raw."""
    parser.add_argument("--pseudo-masks", required=True, type=Path, metavar="OUT",
                        help="output directory of `pmvis pseudo-masks` (its store is OUT/raw)")
