"""Fixtures shared by the package's tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
