"""Shared pytest setup for the hf_ista test suite.

Keep this file generic: fixtures for one feature belong in that feature's test module.
"""
import os

import torch

# Must run before any module decorates a Triton kernel: without a GPU the kernels can only run on
# CPU tensors through Triton's interpreter, and the flag is read when ``@triton.jit`` is applied.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread, restoring the count afterwards.

    On a small, busy CI machine (2 cores shared with other processes) torch's OpenMP threads can
    make small CPU ops orders of magnitude slower; opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
