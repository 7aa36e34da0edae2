"""Convert another codebase's checkpoint into a pmvis checkpoint (VNext IDOL).

`--format idol`: a VNext IDOL checkpoint (projects/IDOL; the detectron2 file with the state dict under
"model"; ResNet-50, YouTube-VIS 2019/2021, OVIS or COCO heads — the class count is read off the
file) becomes a pmvis checkpoint of the weight-compatible `model.mask_head: idol` variant. Every
official tensor must map to exactly one pmvis parameter of the same shape; otherwise the command
fails naming the tensors left over and the parameters missing. Then

    pmvis predict --checkpoint CKPT --data DIR --out results.json

runs IDOL's inference (InferenceConfig's defaults are IDOL's). The output records the class index →
category id map (--category-ids; default 1..C, IDOL's map of the YouTube-VIS/OVIS ids).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="the checkpoint to convert (.pth, torch.save format)")
    parser.add_argument("--format", required=True, choices=["idol"], help="the codebase FILE comes from")
    parser.add_argument("--out", required=True, type=Path, metavar="CKPT", help="pmvis checkpoint file to write")
    parser.add_argument("--category-ids", metavar="ID,ID,...",
                        help="dataset category id of each class index (default: 1..C)")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.errors import PmvisError
    from pmvis.models.vis.convert_idol import import_idol_checkpoint

    ids = None
    if args.category_ids is not None:
        try:
            ids = [int(v) for v in args.category_ids.split(",") if v.strip()]
        except ValueError:
            raise PmvisError(f"--category-ids {args.category_ids!r}: expected comma-separated integers") from None
    out, cfg = import_idol_checkpoint(args.file, args.out, category_ids=ids)
    print(f"wrote {out}: IDOL {cfg.backbone}, {cfg.num_classes} classes, {cfg.num_queries} queries, "
          f"mask_head {cfg.mask_head}")
    return 0
