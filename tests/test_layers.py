"""The package's shape: imports point one way (import-linter contracts in pyproject.toml), and the
CLI's argument parsing stays free of the heavy stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(config: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed (import-linter is a dev dependency in pyproject.toml)")
    args = [exe, "--no-cache"] + (["--config", str(config)] if config else [])
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_imports_point_one_way():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """The same contract over a copy of the package with one models module importing the platform
    must fail and name the import: the check is not a formality."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "pmvis", copy / "pmvis", ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    target = copy / "pmvis" / "models" / "fusion.py"
    target.write_text(target.read_text() + "\nfrom pmvis.platform.data.ytvis import YTVISDataset  # noqa\n")
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = pmvis\n\n"
                      "[importlinter:contract:layers]\nname = layers\ntype = layers\n"
                      "layers =\n    pmvis.cli\n    pmvis.jobs\n    pmvis.platform\n    pmvis.models\n"
                      "    pmvis.kernels\n    pmvis.core\n")
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run([exe, "--no-cache", "--config", str(config)], cwd=copy, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)})
    assert result.returncode != 0
    assert "pmvis.models.fusion -> pmvis.platform.data.ytvis" in result.stdout, result.stdout


def test_cli_help_imports_neither_ray_nor_torch():
    code = ("import sys; from pmvis.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'cv2', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
