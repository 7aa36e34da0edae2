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
