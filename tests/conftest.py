"""Shared fixtures: tiny YTVIS dicts built in code."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pmvis.platform.cluster import use_installed_environment

use_installed_environment()  # as `pmvis` does, before any test module imports ray


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def tiny_ytvis() -> dict:
    """One 2-frame 20x30 video, one category, one instance (a 4x5 rectangle, absent in frame 1)."""
    m = rect(20, 30, 2, 6, 3, 8)
    return {
        "videos": [{"id": 1, "width": 30, "height": 20, "length": 2,
                    "file_names": ["v1/00000.jpg", "v1/00001.jpg"]}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentations": [rle(m), None], "bboxes": [[3.0, 2.0, 5.0, 4.0], None],
                         "areas": [20, None]}],
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's in-process model tests: the tiny model runs as fast on
    one thread, and far faster when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray of the test session (2 CPUs, small object store, no dashboard).

    Workers get tests/ on PYTHONPATH so test-only source plugins can be imported there.
    """
    import os
    from pathlib import Path

    import ray

    tests_dir = str(Path(__file__).resolve().parent)
    pythonpath = os.pathsep.join([tests_dir, str(Path(tests_dir).parent), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = pythonpath  # also for this process's later subprocesses
    if not ray.is_initialized():
        from pmvis.platform.cluster import start_local_ray

        # As pmvis starts a local Ray (loopback only, dashboard for Train V2's placement-group cleanup).
        start_local_ray(num_cpus=2, object_store_memory=300 * 1024**2,
                        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=False)
    yield ray
    ray.shutdown()
