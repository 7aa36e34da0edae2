"""Filter noisy ground truth with the pseudo masks: RIA drops inaccurate masks, Missing-Data finds null frames.

Reads the ground truth of dataset DIR and the raw pseudo-mask store OUT/raw; writes the cleaned
annotations to CLEAN.json and the report (a JSON list of {video_id, annotation_id, frame, kind,
reason, ...} with kind "inaccurate" or "missing", the kinds of `pmvis synth`'s defects.json) to
--report (default CLEAN.report.json). Every knob is in FilterConfig (pmvis/platform/pseudo/filters.py),
including the fusion under "fuse:"; set them in --config FILTER.yaml. The effective config is
written beside the output as CLEAN.config.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmvis.jobs import add_dataset_arguments, add_pseudo_masks_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    add_pseudo_masks_argument(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="CLEAN.json", help="cleaned annotations to write")
    parser.add_argument("--config", type=Path, metavar="FILTER.yaml", help="YAML file of FilterConfig knobs")
    parser.add_argument("--report", type=Path, metavar="REPORT.json", help="report path (default: CLEAN.report.json)")


def run(args: argparse.Namespace) -> int:
    from pmvis.core.config import dump_config, effective_config_path, load_config
    from pmvis.core.errors import PmvisError
    from pmvis.core.io import write_json_atomic, write_text_atomic
    from pmvis.platform.data.ytvis_io import check_output_for_dataset, load_dataset_dir, save_ytvis
    from pmvis.platform.pseudo.filters import REPORT_KINDS, FilterConfig
    from pmvis.platform.pseudo.refine import refine
    from pmvis.platform.pseudo.store import resolve_raw_dir

    config = load_config(FilterConfig, args.config)
    dataset = load_dataset_dir(args.data, args.annotations)
    check_output_for_dataset(args.out, dataset)
    report_path = args.report if args.report is not None else args.out.with_suffix(".report.json")
    config_file = effective_config_path(args.out)
    if len({args.out.resolve(), report_path.resolve(), config_file.resolve()}) < 3:
        raise PmvisError(f"{report_path}: the report path must differ from --out and {config_file}")
    check_output_for_dataset(report_path, dataset, flag="--report")
    check_output_for_dataset(config_file, dataset, flag="--out's config file")
    refined = refine(resolve_raw_dir(args.pseudo_masks), dataset, filt=config)
    clean, report = refined.cleaned, refined.filter_report
    save_ytvis(clean, args.out)
    write_json_atomic(report_path, report, indent=1)
    write_text_atomic(config_file, dump_config(config))

    c = clean.info["filter"]["counts"]
    kinds = ", ".join(f"{c[k]} {k}" for k in REPORT_KINDS)
    ria = (f"RIA (tau {config.ria_tau}): {c['ria_checked']} GT masks checked, {c['inaccurate']} dropped, "
           f"{c['ria_no_fused_mask']} without a fused mask left alone" if config.ria else "RIA: off")
    missing = (f"Missing-Data ({', '.join(config.missing_sources)}, action {config.missing_action}): "
               f"{c['null_frames']} null frames checked, {c['missing']} found" if config.missing else "Missing-Data: off")
    print(
        f"pmvis filter: {len(clean.annotations)} annotations; report: {kinds}\n"
        f"  {ria}\n"
        f"  {missing}\n"
        f"  written to {args.out} (report: {report_path}, config: {config_file})"
    )
    return 0
