"""Fixtures shared by the package's tests."""

import os

import pytest
import torch
from hypothesis import settings

# Example budgets of the property tests. The suite runs 200 examples per test; mutation runs
# (scripts/mutation_test.sh sets HYPOTHESIS_PROFILE=mutation) run 20, so that the tests of one
# mutant take seconds: a mutant that survives 20 examples is reported, not hidden.
settings.register_profile("full", max_examples=200, deadline=None)
settings.register_profile("mutation", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
