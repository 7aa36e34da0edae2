"""The fused Triton kernels against the torch path: forward value and gradient.

Without a GPU the kernels run in Triton's interpreter, which works on CPU tensors but must be
switched on (``TRITON_INTERPRET=1``) before the kernels are defined; so those checks run in a
subprocess started with that variable, leaving this process (and any real GPU use) untouched.
On a CUDA machine the same checks also run compiled on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tk_cases(device, dtype):
    from pmvis.kernels import tk_affinity

    g = torch.Generator().manual_seed(0)
    for patch, window, dilation, k, frames, pairs in ((3, 3, 3, 5, 3, None), (1, 5, 1, 9, 4, [(3, 0), (1, 2)]),
                                                     (5, 3, 1, 1, 2, None)):
        n, h, w = 3, 7, 9
        lab = torch.rand(frames, 3, h, w, generator=g, dtype=torch.float64) * (16.0 if patch == 1 else 9.0 / patch)
        logits = torch.randn(n, frames, h, w, generator=g, dtype=torch.float64) * 2
        boxes = torch.zeros(n, frames, h, w, dtype=torch.float64)
        boxes[0, :, 1:5, 2:7] = 1
        boxes[2, frames - 1, 3:, 4:] = 1  # instance 1 has no box at all
        aff = tk_affinity(lab.to(device, dtype), pairs=pairs, patch_size=patch, window=window,
                          dilation=dilation, k=k)
        yield logits.to(device, dtype), boxes.to(device, dtype), aff


def _pairwise_cases(device, dtype):
    g = torch.Generator().manual_seed(1)
    n, h, w = 3, 8, 9
    for kernel, dilation, per_instance, valid_kind in ((3, 2, False, None), (3, 1, True, "instance"),
                                                       (5, 1, False, "image")):
        logits = torch.randn(n, h, w, generator=g, dtype=torch.float64) * 2
        lab = torch.rand((n, 3, h, w) if per_instance else (3, h, w), generator=g, dtype=torch.float64) * 3
        boxes = torch.zeros(n, h, w, dtype=torch.float64)
        boxes[0, 1:6, 2:8] = 1
        boxes[2, 4:, :5] = 1
        valid = None
        if valid_kind == "instance":
            valid = torch.rand(n, h, w, generator=g) > 0.2
        elif valid_kind == "image":
            valid = torch.ones(h, w, dtype=torch.bool)
            valid[-2:] = False
        yield (logits.to(device, dtype), lab.to(device, dtype), boxes.to(device, dtype),
               None if valid is None else valid.to(device), dict(kernel=kernel, dilation=dilation))


def _compare(fn, logits, tol):
    results = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, backend)
        loss.backward()
        results[backend] = (loss.detach(), x.grad)
    (l_ref, g_ref), (l_tri, g_tri) = results["torch"], results["triton"]
    assert l_ref.item() > 0
    torch.testing.assert_close(l_tri, l_ref, **tol)
    torch.testing.assert_close(g_tri, g_ref, **tol)


TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def check_tk(device="cpu"):
    from pmvis.kernels import tk_loss

    for dtype, tol in TOLERANCES.items():
        for logits, boxes, aff in _tk_cases(device, dtype):
            _compare(lambda x, b: tk_loss(x, boxes, aff, backend=b), logits, tol)


def check_pairwise(device="cpu"):
    from pmvis.kernels import pairwise_loss

    for dtype, tol in TOLERANCES.items():
        for logits, lab, boxes, valid, kw in _pairwise_cases(device, dtype):
            _compare(lambda x, b: pairwise_loss(x, lab, boxes, valid=valid, backend=b, **kw), logits, tol)


def _interpret(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, check], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{check} ok" in out.stdout


@pytest.mark.parametrize("check", ["check_tk", "check_pairwise"])
def test_triton_interpreter_matches_torch(check):
    pytest.importorskip("triton")
    _interpret(check)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("check", ["check_tk", "check_pairwise"])
def test_triton_cuda_matches_torch(check):
    pytest.importorskip("triton")
    globals()[check]("cuda")


def test_cpu_use_does_not_import_triton():
    code = ("import sys, torch; from pmvis.kernels import tk_affinity, tk_loss, pairwise_loss\n"
            "a = tk_affinity(torch.rand(2, 3, 5, 5)); tk_loss(torch.rand(1, 2, 5, 5), torch.ones(1, 2, 5, 5), a)\n"
            "pairwise_loss(torch.rand(1, 5, 5), torch.rand(3, 5, 5), torch.ones(1, 5, 5))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr


if __name__ == "__main__":  # python tests/test_kernels_triton.py check_tk  (with TRITON_INTERPRET=1)
    globals()[sys.argv[1]]()
    print(f"{sys.argv[1]} ok")
