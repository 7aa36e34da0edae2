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
