"""The command line: every command has --help; the demo runs end to end on its embedded default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pmvis.cli import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "pmvis", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: pmvis " + command in out.stdout


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pmvis", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_demo_tiny(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "box_baseline" in text and "AP50" in text
    box = json.loads((tmp_path / "demo/metrics_box_baseline.json").read_text())
    ann = json.loads((tmp_path / "demo/metrics_annotation_masks.json").read_text())
    # The noisy annotation masks are closer to the truth than filled boxes are.
    assert ann["AP"] > box["AP"]
    assert (tmp_path / "demo/data/defects.json").exists()
