"""Benchmarks stay runnable: each runs at a tiny size and checks its own equality claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_benchmark_metrics_identical():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/evaluate.py"), "--videos", "12", "--frames", "8",
         "--size", "96", "160", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^identical metrics \(.*\): True$", out.stdout, re.M), out.stdout


def test_track_benchmark_compares_both_trackers(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/track.py"), "--videos", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^\| flow only \(flow_search 0\) \|", out.stdout, re.M), out.stdout
    assert re.search(r"^\| flow \+ template matching \(default\) \|", out.stdout, re.M), out.stdout
    assert (tmp_path / "track.json").is_file()


def test_inference_rules_benchmark_scores_every_variant(tmp_path):
    import torch

    from pmvis.models.vis import build_model
    from pmvis.models.vis.checkpoint import save_checkpoint
    from pmvis.models.vis.config import ModelConfig
    from pmvis.platform.data.synthetic import generate_synthetic
    from pmvis.platform.data.synthetic_scenes import SynthConfig

    generate_synthetic(tmp_path / "data", SynthConfig(videos=3, frames=3, seed=0), overwrite=True)
    cfg = ModelConfig.tiny(num_classes=5)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "runs" / "box_only" / "checkpoint_00000001" / "checkpoint.pt", build_model(cfg), cfg,
                    extra={"val_videos": [1, 2], "category_ids": [1, 2, 3, 4, 5]})
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/inference_rules.py"), str(tmp_path),
                          "--runs", "box_only", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for variant in ("idol", "idol, association=mutual_best", "first rules"):
        assert re.search(rf"^\| box_only \| {re.escape(variant)} \| \d+\.\d \|", out.stdout, re.M), out.stdout
