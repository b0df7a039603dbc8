"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny problems: one thread is faster, and far steadier on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Hypothesis profiles for the property tests (tests/test_invariants.py reads max_examples):
# "fast" for `make test` (deterministic), "full" (FPSOLVE_HYPOTHESIS=full) for >= 10,000 cases.
import os  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("fast", max_examples=200, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("full", max_examples=6700, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("FPSOLVE_HYPOTHESIS", "fast"))
except ImportError:   # hypothesis is a dev dependency; its tests skip without it
    pass
