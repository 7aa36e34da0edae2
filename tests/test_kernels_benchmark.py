"""The kernels benchmark stays runnable and its formulations agree (tiny size, no timing claims)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_benchmark_formulations_agree():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/kernels.py"), "--size", "24", "32", "--layers", "2",
         "--instances", "3", "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("same loss and gradients (float64): True") == 2
    assert "same losses and gradients (float64): True" in out.stdout
    assert "tk:" in out.stdout and "pairwise:" in out.stdout
