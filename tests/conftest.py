import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(int(os.environ.get("CPU_THREADS", 1)))  # tiny models: 1 thread is as fast and stable


@pytest.fixture(scope="session")
def random_denoiser():
    """common.random_denoiser(family), built once per session (a real-size build fills 0.6-0.9B random weights, ~10 s
    each). Callers must not modify the returned network: copy it first."""
    import common

    cache = {}
    return lambda family: cache.setdefault(family, common.random_denoiser(family).eval())
