"""Benchmark: the Ray Train loop against a bare single-process loop, and 2 workers against 1.

All three run the same code path for a step (``TrainingLoop.step``: clip sampling with prefetch,
forward, losses, backward, gradient clipping, AdamW) on the same model, data and batch size:

* **bare**: ``TrainingLoop`` in this process, no Ray (``torch`` threads = ``cpus_per_worker``);
* **ray ×1**: ``run_training`` with one worker (no DDP wrap at world size 1);
* **ray ×2**: two workers, DDP (gloo on CPU, NCCL on GPU), each with its own shard and batch.

Speed is steady-state iterations/s after the first iteration (start-up, checkpointing, MLflow and
evaluation excluded; the Ray numbers are measured inside rank 0). Printed: the Ray ×1 overhead
against bare (goal ≤ 5 %) and the 2-worker speed-up in clips/s (each worker trains
``batch_size`` clips per iteration). Default: the tiny model on CPU on a small synthetic set; on
a 2-core machine two 1-CPU workers share the cores with everything else, so the scaling number is
only meaningful with free cores or ``--gpu``.

    uv run python benchmarks/train.py                       # tiny model, CPU
    uv run python benchmarks/train.py --model r50 --gpu     # the paper's model, one GPU per worker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_loop(cfg, iterations: int) -> float:
    import torch

    from pmvis.platform.train.loop import TrainingLoop

    device = "cuda" if cfg.use_gpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    loop = TrainingLoop(cfg, device=device)
    t_first = None
    for it in range(iterations):
        loop.step(it, prefetch_next=it + 1 < iterations)
        if device == "cuda":
            torch.cuda.synchronize()
        if t_first is None:
            t_first = time.perf_counter()
    elapsed = time.perf_counter() - t_first
    loop.close()
    return (iterations - 1) / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "r50"), default="tiny")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (and for the bare loop)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2, help="clips per worker")
    p.add_argument("--frames", type=int, default=2, help="frames per clip")
    p.add_argument("--size", type=int, nargs=2, default=(64, 96), metavar=("H", "W"), help="synthetic frame size")
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--no-two-workers", action="store_true", help="skip the 2-worker run")
    args = p.parse_args(argv)

    import ray

    from pmvis.platform.data.synthetic import generate_synthetic
    from pmvis.platform.data.synthetic_scenes import SynthConfig
    from pmvis.platform.train.config import TrainConfig
    from pmvis.platform.train.driver import run_training

    tmp = Path(tempfile.mkdtemp(prefix="pmvis-bench-train-"))
    data = tmp / "data"
    h, w = args.size
    generate_synthetic(data, SynthConfig(videos=args.videos, frames=6, height=h, width=w, seed=1))
    common = dict(iterations=args.iterations, batch_size=args.batch_size, checkpoint_every=args.iterations,
                  log_every=args.iterations, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                  storage_path=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                  experiment="bench-train", data={"val_fraction": 0.0, "clip_frames": args.frames})
    if args.model == "tiny":
        base = TrainConfig.tiny(data, **common)
    else:
        from pmvis.core.config import merge_values
        from pmvis.models.vis.config import ModelConfig

        values = merge_values({"model": ModelConfig(num_classes=5).model_dump(mode="json"),
                               "data": {"data_dir": str(data)}}, common)
        base = TrainConfig.model_validate(values)

    print(f"model {args.model}, {'GPU' if args.gpu else 'CPU'}, batch {args.batch_size} clips × {args.frames} frames "
          f"per worker, {h}x{w} frames, {args.iterations} iterations")
    bare = bare_loop(base, args.iterations)
    print(f"bare loop        : {bare:7.3f} it/s")
    ray.init(num_cpus=max(2, 2 * args.cpus_per_worker), include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    one = run_training(base.model_copy(update={"num_workers": 1, "run_name": "one"})).steady_it_per_s
    print(f"ray train ×1     : {one:7.3f} it/s")
    overhead = 1 - one / bare
    print(f"ray ×1 overhead vs bare: {100 * overhead:+.1f}% (goal ≤ 5%)")
    if not args.no_two_workers:
        two = run_training(base.model_copy(update={"num_workers": 2, "run_name": "two"})).steady_it_per_s
        print(f"ray train ×2     : {two:7.3f} it/s per worker")
        print(f"2 workers vs 1: {2 * two / one:.2f}× clips/s ({two / one:.2f}× iterations/s per worker)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
