"""Method benchmark: box-only vs PM-VIS vs PM-VIS + TK-Loss vs fully supervised, same budget.

On a synthetic YouTube-VIS set larger than the demo's (default 60 videos × 8 frames, a third
held out: 40 training and 20 held-out videos; ``--seed`` changes it), with the demo's pipeline:

1. box-only IDOL-BoxInst (tiny, from the shipped box-pretrained weights unless --no-pretrained);
2. pseudo masks on Ray Data: GrabCut, the optical-flow tracker seeded with GrabCut, the box-only
   model (``boxinst`` source); DOOB/SCM/SHQM fusion; the RIA and Missing-Data filters;
3. PM-VIS, PM-VIS + TK-Loss and fully supervised (GT masks; it trains beside the box-only model),
   two at a time on one torch thread each, all with the same iterations;

then prints (and writes OUT/method.json, OUT/method.md):

* held-out AP / AP50 / AP75 / AR10 of the four models against the TRUE masks, and
  ``gap closed = (PM-VIS − box-only) / (full − box-only)``;
* pseudo-mask quality per source (mean IoU with the true masks on the annotated frames, share
  above 0.5 / 0.75; the filled box as reference);
* RIA ("inaccurate") and Missing-Data ("missing") precision / recall against ``defects.json``.

    uv run python benchmarks/method.py                       # ~10 min on 2 quiet cores (7 at 800 iterations)
    uv run python benchmarks/method.py --seed 1 --iterations 600
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {"box-only": "boxinst", "pmvis": "pmvis", "pmvis+tk": "pmvis", "full": "full"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=60)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--held-out", type=int, default=20, help="held-out videos (scored against the truth)")
    p.add_argument("--iterations", type=int, default=1200, help="training iterations of every model")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--no-pretrained", action="store_true", help="train every model from scratch")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start every model from this checkpoint (e.g. a `pmvis pretrain --export` candidate) "
                        "instead of the shipped weights")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/method"))
    args = p.parse_args(argv)
    if not 0 < args.held_out < args.videos:
        p.error("--held-out must be between 1 and --videos - 1")

    import ray

    from pmvis.core.config import build_config
    from pmvis.core.io import write_json_atomic, write_text_atomic
    from pmvis.models.vis.checkpoint import CHECKPOINT_FILENAME
    from pmvis.models.weights import TINY_PRETRAINED, shipped_weights
    from pmvis.platform.cluster import connect
    from pmvis.platform.data.synthetic import generate_synthetic
    from pmvis.platform.data.synthetic_scenes import SynthConfig
    from pmvis.platform.data.ytvis_io import load_ytvis, save_ytvis
    from pmvis.platform.demo.config import DEMO_FINETUNE_LR, TRACK_OPTIONS, TRAIN_TORCH_THREADS
    from pmvis.platform.demo.run import filter_config, train_side_by_side
    from pmvis.platform.experiments import default_tracking_uri
    from pmvis.platform.pseudo.generate import generate_pseudo_masks
    from pmvis.platform.pseudo.plan import PseudoMaskConfig
    from pmvis.platform.pseudo.refine import refine
    from pmvis.platform.pseudo.store import RAW_DIRNAME
    from pmvis.platform.report import ReportConfig, build_report, format_report
    from pmvis.platform.train.config import TINY_INFERENCE, TrainConfig

    t0 = time.perf_counter()
    out = args.out.resolve()
    data_dir = out / "data"
    synth = build_config(SynthConfig, {"videos": args.videos, "frames": args.frames, "seed": args.seed},
                         source="benchmark")
    generate_synthetic(data_dir, synth, overwrite=True, progress=True)
    annotations = load_ytvis(data_dir / "annotations.json", check_frames=True)
    tracking_uri = default_tracking_uri(out / "mlflow")
    start = None if args.no_pretrained else (args.init_from or str(shipped_weights(TINY_PRETRAINED)))
    connect("local")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    timings: dict[str, float] = {}

    def config(name: str, mode: str, cpus_per_worker: int, loss: dict | None = None, data: dict | None = None) -> Any:
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        return TrainConfig.tiny(
            data_dir, iterations=args.iterations, run_name=name, storage_path=str(out / "runs"), init_from=start,
            experiment="pmvis-method-benchmark", tracking_uri=tracking_uri, cpus_per_worker=cpus_per_worker,
            checkpoint_every=args.iterations, print_every=max(args.iterations // 10, 1),
            lr_steps=[int(args.iterations * 0.8)], **({"lr": DEMO_FINETUNE_LR} if start else {}), loss={"mode": mode, **(loss or {})},
            data={"eval_annotations": "truth.json", "val_fraction": args.held_out / args.videos, **(data or {})},
        )

    t = time.perf_counter()  # full needs no pseudo masks: it trains beside box-only
    results: dict[str, Any] = dict(zip(("box-only", "full"), train_side_by_side([
        config("box_only", "boxinst", TRAIN_TORCH_THREADS), config("full", "full", TRAIN_TORCH_THREADS)])))
    timings["box-only and full training"] = time.perf_counter() - t

    t = time.perf_counter()
    pseudo_masks_dir = out / "pseudo_masks"
    shutil.rmtree(pseudo_masks_dir, ignore_errors=True)
    options = {"track": dict(TRACK_OPTIONS), "grabcut": {},
               "boxinst": {"checkpoint": str(Path(results["box-only"].checkpoint) / CHECKPOINT_FILENAME),
                           "inference": dict(TINY_INFERENCE), "actors": cpus}}
    options["track"]["actors"] = cpus
    generate_pseudo_masks(data_dir, pseudo_masks_dir, build_config(
        PseudoMaskConfig, {"sources": ["grabcut", "track", "boxinst"], "source_options": options}, source="benchmark"))
    filter_cfg = filter_config(TRACK_OPTIONS)
    # the filters are timed with the masks; the report repeats them
    refined = refine(pseudo_masks_dir / RAW_DIRNAME, annotations, fuse=filter_cfg.fuse, filt=filter_cfg)
    save_ytvis(refined.fused, out / "train_pseudo.json")
    timings["pseudo masks + fusion + filters"] = time.perf_counter() - t
    report = build_report(data_dir, pseudo_masks_dir, out / "report", ReportConfig(filter=filter_cfg), tracking_uri=tracking_uri)

    t = time.perf_counter()
    pseudo = {"pseudo_annotations": str(out / "train_pseudo.json")}
    results["pmvis"], results["pmvis+tk"] = train_side_by_side([
        config("pmvis", "pmvis", TRAIN_TORCH_THREADS, data=pseudo),
        config("pmvis_tk", "pmvis", TRAIN_TORCH_THREADS, loss={"tk": True}, data=pseudo)])
    timings["PM-VIS and PM-VIS+TK training"] = time.perf_counter() - t

    ap = {k: (r.evaluation or {}) for k, r in results.items()}
    gap = ap["full"].get("AP", 0.0) - ap["box-only"].get("AP", 0.0)
    closed = (ap["pmvis"].get("AP", 0.0) - ap["box-only"].get("AP", 0.0)) / gap if gap > 0 else None
    lines = [f"# Method benchmark: {args.videos - args.held_out} training / {args.held_out} held-out videos × "
             f"{args.frames} frames, seed {args.seed}, {args.iterations} iterations per model, "
             f"{f'box-pretrained start ({Path(start).name})' if start else 'from scratch'}", "",
             "| model | AP | AP50 | AP75 | AR10 |", "|---|---|---|---|---|"]
    for k, ev in ap.items():
        lines.append(f"| {k} | " + " | ".join("-" if ev.get(n) is None else f"{ev[n]:.1f}"
                                              for n in ("AP", "AP50", "AP75", "AR10")) + " |")
    lines += ["", "gap closed = (PM-VIS − box-only) / (full − box-only) = "
                  + ("n/a (full ≤ box-only)" if closed is None else f"{closed:.2f}"),
              f"TK-Loss: PM-VIS + TK − PM-VIS = {ap['pmvis+tk'].get('AP', 0.0) - ap['pmvis'].get('AP', 0.0):+.1f} AP",
              "", "Pseudo masks against the true masks, and the filters against defects.json:", "",
              "```", format_report(report), "```", ""]
    wall = time.perf_counter() - t0
    lines += [f"{name}: {s / 60:.1f} min" for name, s in timings.items()] + [f"total: {wall / 60:.1f} min"]
    text = "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "method.md", text + "\n")
    write_json_atomic(out / "method.json", {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "evaluation": ap, "gap_closed": closed, "quality": report.get("quality"), "filters": report.get("filters"),
        "timings_s": timings, "wall_s": wall}, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
