import contextlib
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

    def build(family):
        if family not in cache:
            with all_cores():  # filling 0.6-0.9B random weights: both cores
                cache[family] = common.random_denoiser(family).eval()
        return cache[family]
    return build


@contextlib.contextmanager
def all_cores():
    """Real-size networks: every core (the suite's 1 thread is for the tiny models), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def real_size_threads():
    with all_cores():
        yield
