"""When does solve need a gradient? Only with grad mode on, backward != "none", and x or a
tensor f uses requiring grad.

Written for the version where gradients were a stub (NotImplementedError exactly when a gradient
is needed); now that backward modes exist (fpsolve.Implicit), the same cases are checked as
"sol.z requires grad exactly when a gradient is needed". Delete this file once the backward
modes have their own tests.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fpsolve

BACKWARDS = ["implicit", "phantom", "unroll"]
GRADIENTS_IMPLEMENTED = hasattr(fpsolve, "Implicit")


def _data(requires_grad=False):
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=requires_grad)
    return torch.zeros(3, 2, dtype=torch.float64), x


def _expect_gradient_needed():
    """Stub version: NotImplementedError. Implemented version: sol.z must require grad."""
    if GRADIENTS_IMPLEMENTED:
        return contextlib.nullcontext()
    return pytest.raises(NotImplementedError, match="backward")


@pytest.mark.parametrize("backward", BACKWARDS + [None])
def test_gradient_needed_when_x_requires_grad(backward):
    z0, x = _data(requires_grad=True)
    kw = {} if backward is None else dict(backward=backward)
    with _expect_gradient_needed():
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, z0, x, rtol=1e-10, **kw)
        assert sol.z.requires_grad
        torch.testing.assert_close(sol.z.detach(), 2 * x.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradient_needed_when_a_closed_over_parameter_requires_grad(backward):
    z0, x = _data()
    W = torch.eye(2, dtype=torch.float64, requires_grad=True)
    with _expect_gradient_needed():
        sol = fpsolve.solve(lambda z, x: 0.5 * z @ W + x, z0, x, backward=backward, rtol=1e-10)
        assert sol.z.requires_grad


@pytest.mark.parametrize("backward", BACKWARDS)
def test_no_gradient_under_no_grad(backward):
    z0, x = _data(requires_grad=True)
    with torch.no_grad():
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, z0, x, backward=backward, rtol=1e-10)
    assert sol.converged.all()
    assert not sol.z.requires_grad
    torch.testing.assert_close(sol.z, 2 * x.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_no_gradient_when_nothing_requires_grad(backward):
    z0, x = _data()
    sol = fpsolve.solve(lambda z, x: 0.5 * z + x, z0, x, backward=backward, rtol=1e-10)
    assert sol.converged.all()
    assert not sol.z.requires_grad
    torch.testing.assert_close(sol.z, 2 * x, atol=1e-9, rtol=0)


def test_backward_none_never_needs_a_gradient_and_detaches():
    z0, x = _data(requires_grad=True)
    sol = fpsolve.solve(lambda z, x: 0.5 * z + x, z0, x, backward="none", rtol=1e-10)
    assert sol.converged.all()
    assert not sol.z.requires_grad
    torch.testing.assert_close(sol.z, 2 * x.detach(), atol=1e-9, rtol=0)


def test_z0_requiring_grad_alone_needs_no_gradient():
    """The fixed point does not depend on the starting point, so a z0 that requires grad (e.g. a
    warm start from an earlier solution) with nothing else requiring grad needs no gradient:
    solve must work, and sol.z must not require grad (API: only x or tensors f uses count)."""
    x = torch.randn(3, 2, dtype=torch.float64)
    z0 = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    sol = fpsolve.solve(lambda z, x: 0.5 * z + x, z0, x, rtol=1e-10)
    assert sol.converged.all()
    assert not sol.z.requires_grad
    torch.testing.assert_close(sol.z, 2 * x, atol=1e-9, rtol=0)
