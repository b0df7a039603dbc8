"""Cross-check against torchdeq's solvers on the same problems (same fixed point)."""
from __future__ import annotations

import pytest
import torch

torchdeq_solver = pytest.importorskip("torchdeq.solver")

import fpsolve  # noqa: E402

from problems import linear_map, linear_problem, mean_hw_problem, tanh_problem  # noqa: E402

# fpsolve name -> torchdeq name
PAIRS = [("fixed_point", "fixed_point_iter"), ("anderson", "anderson"), ("broyden", "broyden")]


def _torchdeq(name, f, z0, tol=1e-10, max_iter=500):
    solve = torchdeq_solver.get_solver(name)
    with torch.no_grad():
        z, _, info = solve(f, z0, max_iter=max_iter, tol=tol, stop_mode="abs")
    return z


def _fpsolve(name, f, z0, x):
    return fpsolve.solve(f, z0, x, solver=name, rtol=1e-11, max_iter=500)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_linear_map_agrees_with_torchdeq(ours, theirs):
    p = linear_problem(B=3, n=5, q=0.8)
    # torchdeq solves the whole batch at once, so it may close over the per-sample data
    z_td = _torchdeq(theirs, lambda z: linear_map(z, p.x), p.z0)
    sol = _fpsolve(ours, p.f, p.z0, p.x)
    assert sol.converged.all()
    torch.testing.assert_close(sol.z, z_td, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(sol.z, p.answer, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_tanh_map_agrees_with_torchdeq(ours, theirs):
    p = tanh_problem(B=4, n=6)
    z_td = _torchdeq(theirs, lambda z: p.f(z, p.x), p.z0)
    sol = _fpsolve(ours, p.f, p.z0, p.x)
    assert sol.converged.all()
    torch.testing.assert_close(sol.z, z_td, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_image_state_agrees_with_torchdeq(ours, theirs):
    p = mean_hw_problem(B=2, C=2, H=3, W=3)
    z_td = _torchdeq(theirs, lambda z: p.f(z, p.x), p.z0)
    sol = _fpsolve(ours, p.f, p.z0, p.x)
    assert sol.converged.all()
    assert z_td.shape == sol.z.shape
    torch.testing.assert_close(sol.z, z_td, atol=1e-7, rtol=1e-7)


def test_anderson_is_at_least_as_accurate_as_torchdeq_within_the_same_budget():
    """Both Anderson methods on a slow map with the same number of evaluations of f."""
    p = linear_problem(B=2, n=10, q=0.95, seed=2)
    f_td = lambda z: linear_map(z, p.x)  # noqa: E731
    solve = torchdeq_solver.get_solver("anderson")
    with torch.no_grad():
        _, _, info = solve(f_td, p.z0, max_iter=30, tol=1e-12, stop_mode="abs")
    td_best = info["abs_lowest"].double()
    steps = int(info["nstep"].max())
    sol = fpsolve.solve(p.f, p.z0, p.x, solver="anderson", atol=1e-12, rtol=0.0, max_iter=steps)
    assert (sol.iterations <= steps).all()
    assert (sol.residual <= td_best * 1.01).all(), (sol.residual, td_best)
