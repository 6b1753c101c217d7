"""Reliability suite settings.

One torch thread, here and in every child process (helpers.python_script): on this 2-core machine
other work (other test sessions, benchmarks) often holds the cores, and torch's OpenMP threads then
spin at every barrier of the tiny model's many small ops; with one thread the suite runs 5-10x
faster under load and the timings of the concurrency test are not distorted. Restored afterwards.
"""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
