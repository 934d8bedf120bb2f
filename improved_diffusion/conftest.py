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

# `make test` runs the suite in one pytest-xdist worker per core (most tests are tiny networks that
# keep one core busy). Each worker then takes its share of the cores, so that the workers' own
# torch threads do not fight over them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _workers))


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
