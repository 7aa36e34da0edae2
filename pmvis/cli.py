"""`pmvis <command>`: one subcommand per module in :mod:`pmvis.jobs`.

Each job module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and its docstring's
first line is the command's one-line help. Bad input raises :class:`PmvisError`, printed here
without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pmvis.core.errors import PmvisError
from pmvis.platform.cluster import use_installed_environment

# command name -> module under pmvis.jobs (imported lazily: `pmvis --help` must not import Ray/torch)
COMMANDS: dict[str, str] = {
    "synth": "synth",
    "pseudo-masks": "pseudo_masks",
    "report": "report",
    "evaluate": "evaluate",
    "demo": "demo",
    "fuse": "fuse",
    "filter": "filter",
    "train": "train",
    "pretrain": "pretrain",
    "predict": "predict",
    "import-checkpoint": "import_checkpoint",
    "compare": "compare",
    "sweep": "sweep",
}

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


def _summary(module_name: str) -> str:
    module = importlib.import_module(f"pmvis.jobs.{module_name}")
    return (module.__doc__ or "").strip().splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmvis",
        description="Box-supervised video instance segmentation at cluster scale (PM-VIS, MaskFreeVIS).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"pmvis.jobs.{module_name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_installed_environment()  # before any job imports ray
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except PmvisError as e:
        print(f"pmvis {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # its message, if any, says how to continue (pmvis train: resume)
        print(f"pmvis {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
