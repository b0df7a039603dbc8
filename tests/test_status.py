"""Honest status: CONVERGED / MAX_ITER / DIVERGED, finite z, residuals that can be recomputed."""
from __future__ import annotations

import enum

import pytest
import torch

import fpsolve
from fpsolve import Status

from problems import (COS_FIXED_POINT, SOLVERS, generator, linear_map, linear_problem,
                      per_sample_norm, residual_at)


def test_status_is_an_int_enum_with_the_three_codes():
    assert issubclass(Status, enum.IntEnum)
    assert {s.name for s in Status} >= {"CONVERGED", "MAX_ITER", "DIVERGED"}
    assert len({int(Status.CONVERGED), int(Status.MAX_ITER), int(Status.DIVERGED)}) == 3


def _cos_with_scale(z, x):
    return torch.cos(z) * x


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_sample_is_diverged_and_does_not_disturb_the_others(solver):
    x_good = torch.tensor([1.0, 0.5, 0.9], dtype=torch.float64)
    x = torch.tensor([1.0, float("nan"), 0.5, 0.9], dtype=torch.float64)
    kw = dict(solver=solver, rtol=1e-10, max_iter=200)
    ref = fpsolve.solve(_cos_with_scale, torch.zeros(3, dtype=torch.float64), x_good, **kw)
    sol = fpsolve.solve(_cos_with_scale, torch.zeros(4, dtype=torch.float64), x, **kw)
    assert ref.converged.all()
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED, Status.CONVERGED, Status.CONVERGED]
    assert sol.converged.tolist() == [True, False, True, True]
    assert torch.isfinite(sol.z).all()
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(sol.z[keep], ref.z, rtol=1e-12, atol=1e-14)
    assert torch.equal(sol.iterations[keep], ref.iterations)
    torch.testing.assert_close(sol.residual[keep], ref.residual, rtol=1e-9, atol=1e-15)
    assert abs(sol.z[0].item() - COS_FIXED_POINT) < 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_sample_under_batch_halting(solver):
    x = torch.tensor([1.0, float("nan"), 0.5], dtype=torch.float64)
    sol = fpsolve.solve(_cos_with_scale, torch.zeros(3, dtype=torch.float64), x, solver=solver,
                        rtol=1e-10, max_iter=200, halting="batch")
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED, Status.CONVERGED]
    assert torch.isfinite(sol.z).all()
    assert abs(sol.z[0].item() - COS_FIXED_POINT) < 1e-9


def test_growing_sample_is_diverged():
    """z -> a z + 1 with a = 3 grows under plain iteration; a = 0.5 converges to 2."""
    x = torch.tensor([[0.5], [3.0], [0.5]], dtype=torch.float64)
    f = lambda z, x: x * z + 1  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(3, 1, dtype=torch.float64), x, solver="fixed_point",
                        rtol=1e-10, max_iter=200)
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED, Status.CONVERGED]
    assert torch.isfinite(sol.z).all()
    assert sol.iterations[1] < 200, "a blown-up sample should stop before the budget"
    torch.testing.assert_close(sol.z[[0, 2]], torch.full((2, 1), 2.0, dtype=torch.float64), atol=1e-8, rtol=0)
    # z is the best iterate seen, and its residual is that of z
    torch.testing.assert_close(sol.residual, residual_at(f, sol.z, x))


@pytest.mark.parametrize("solver", SOLVERS)
def test_sample_that_turns_non_finite_midway_is_diverged(solver):
    """z -> z + 1 has no fixed point; f returns inf once z > 5. Other samples solve normally."""
    bad = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)[:, None]
    if solver == "broyden":   # (its line search never gets past z = 5 here: MAX_ITER, honestly)
        solver = fpsolve.Broyden(line_search=False)

    def f(z, x):
        grow = torch.where(z > 5, torch.full_like(z, float("inf")), z + 1)
        return torch.where(x > 0, grow, 0.5 * z + 1)

    sol = fpsolve.solve(f, torch.zeros(3, 2, dtype=torch.float64), bad, solver=solver,
                        rtol=1e-10, max_iter=100)
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED, Status.CONVERGED]
    assert torch.isfinite(sol.z).all()
    assert torch.isfinite(sol.residual[[0, 2]]).all()
    assert sol.iterations[1] < 100
    torch.testing.assert_close(sol.z[[0, 2]], torch.full((2, 2), 2.0, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_contraction_to_zero_is_never_diverged(solver, dtype):
    """z -> A z with ||A|| = 0.5 (fixed point 0, e.g. a bias-free block on a zero input) from a
    random start, default tolerances. The iterates shrink towards 0 (into the subnormal range);
    that is no divergence: every sample must end CONVERGED (or at worst MAX_ITER), never
    DIVERGED, and z must be close to 0."""
    g = generator(0)
    n = 8
    A = torch.randn(3, n, n, dtype=torch.float64, generator=g)
    A = (A * 0.5 / torch.linalg.matrix_norm(A, ord=2)[:, None, None]).to(dtype)
    z0 = torch.randn(3, n, dtype=torch.float64, generator=g).to(dtype)
    f = lambda z, x: torch.bmm(x, z.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    sol = fpsolve.solve(f, z0, A, solver=solver, max_iter=2000)
    assert not (sol.status == Status.DIVERGED).any(), (sol.status, sol.iterations, sol.residual)
    assert torch.isfinite(sol.z).all()
    assert sol.z.abs().max() < 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_budget_spent_is_max_iter_not_converged(solver):
    p = linear_problem(B=3, n=20, q=0.999, seed=4)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, rtol=1e-12, max_iter=4)
    assert (sol.status == Status.MAX_ITER).all()
    assert not sol.converged.any()
    assert (sol.iterations == 4).all()
    assert torch.isfinite(sol.z).all()
    torch.testing.assert_close(sol.residual, residual_at(p.f, sol.z, p.x), rtol=1e-9, atol=1e-14)
    # the halting criterion does not hold at the returned z (else the sample would have halted)
    fz_norm = per_sample_norm(p.f(sol.z, p.x))
    assert (sol.residual > 1e-12 * fz_norm).all()


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("solver", SOLVERS)
def test_solution_fields_types_and_consistency(solver, record):
    """A mixed batch: a constant map (converges at once), a slow rotation-like contraction that
    cannot finish in 4 evaluations, a mild contraction, and a nan sample."""
    B, n = 4, 10
    A = torch.zeros(B, n, n, dtype=torch.float64)
    A[1] = 0.999 * torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator(1)))[0]
    A[2] = 0.5 * torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator(2)))[0]
    A[3] = float("nan")
    b = torch.ones(B, n, dtype=torch.float64)
    sol = fpsolve.solve(linear_map, torch.zeros(B, n, dtype=torch.float64), (A, b), solver=solver,
                        rtol=1e-12, max_iter=4, record=record)
    assert sol.iterations.dtype == torch.int64 and sol.iterations.shape == (B,)
    assert sol.status.dtype == torch.int64 and sol.status.shape == (B,)
    assert sol.converged.dtype == torch.bool and sol.converged.shape == (B,)
    assert sol.residual.shape == (B,) and sol.residual.dtype == torch.float64
    assert type(sol.evaluations) is int
    # rows stop at a look of the host (every check_every = 4 passes): at most 3 extra passes each
    assert int(sol.iterations.sum()) <= sol.evaluations <= int(sol.iterations.sum()) + 3 * B
    assert torch.equal(sol.converged, sol.status == Status.CONVERGED)
    assert torch.isfinite(sol.z).all()
    assert sol.status[0] == Status.CONVERGED and sol.iterations[0] == 2
    assert sol.status[1] == Status.MAX_ITER and sol.iterations[1] == 4
    assert sol.status[2] == Status.MAX_ITER and sol.iterations[2] == 4
    assert sol.status[3] == Status.DIVERGED and sol.iterations[3] == 1
    ok = sol.status != Status.DIVERGED
    torch.testing.assert_close(sol.residual[ok], residual_at(linear_map, sol.z, (A, b))[ok], rtol=1e-9, atol=1e-14)
    if not record:
        assert sol.trace is None
        return
    T = int(sol.iterations.max())
    assert sol.trace.shape == (T, B) and sol.trace.dtype == torch.float64
    halted = torch.arange(T)[:, None] >= sol.iterations[None, :]
    assert torch.isnan(sol.trace[halted]).all()
    for s in range(3):   # finite samples: every live entry is finite, the residual is the best one
        col = sol.trace[: int(sol.iterations[s]), s]
        assert torch.isfinite(col).all()
        assert sol.residual[s] == col.min()


def test_trace_first_row_is_the_residual_at_z0():
    p = linear_problem(B=3, n=4, q=0.5)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver="fixed_point", rtol=1e-8, record=True)
    torch.testing.assert_close(sol.trace[0], residual_at(p.f, p.z0, p.x))
    # plain iteration on a contraction: the residual falls at every step
    for s in range(3):
        col = sol.trace[: int(sol.iterations[s]), s]
        assert (col[1:] <= col[:-1] * 0.5 * (1 + 1e-9)).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_converged_samples_satisfy_the_criterion_at_the_returned_z(solver):
    p = linear_problem(B=5, n=4, q=0.9, seed=8)
    atol, rtol = 1e-7, 1e-5
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, atol=atol, rtol=rtol, max_iter=500)
    assert sol.converged.all()
    r = residual_at(p.f, sol.z, p.x)
    fz_norm = per_sample_norm(p.f(sol.z, p.x))
    assert (r <= (atol + rtol * fz_norm) * (1 + 1e-9)).all()


def test_converged_status_is_honest_when_a_relative_criterion_is_met_at_a_worse_iterate():
    """z -> 1.05 z + 1 from 0 with rtol=0.4: residuals 1, 1.05, 1.1025 grow, ||f(z)|| grows faster,
    so the criterion first holds at the third iterate, while the smallest residual is at z0 = 0,
    where it does not hold (1 > 0.4 * 1). A sample reported CONVERGED must come back with a z at
    which the halting criterion holds (the z whose residual is reported)."""
    f = lambda z: 1.05 * z + 1  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(1, 1, dtype=torch.float64), solver="fixed_point",
                        rtol=0.4, max_iter=10)
    r = residual_at(f, sol.z, None)
    fz_norm = per_sample_norm(f(sol.z))
    criterion_holds = r <= 0.4 * fz_norm
    assert torch.equal(sol.converged, criterion_holds), (sol.z, sol.residual, sol.status, fz_norm)


@pytest.mark.parametrize("solver", SOLVERS)
def test_z0_is_not_modified(solver):
    p = linear_problem(B=3, n=4)
    z0 = torch.randn(3, 4, dtype=torch.float64, generator=generator(2))
    keep = z0.clone()
    x_keep = tuple(t.clone() for t in p.x)
    fpsolve.solve(p.f, z0, p.x, solver=solver, rtol=1e-10, max_iter=200)
    assert torch.equal(z0, keep)
    assert all(torch.equal(a, b) for a, b in zip(p.x, x_keep))


def test_empty_batch():
    sol = fpsolve.solve(lambda z: 0.5 * z, torch.zeros(0, 3))
    assert sol.z.shape == (0, 3)
    assert sol.iterations.shape == (0,) and sol.status.shape == (0,) and sol.converged.shape == (0,)
    assert sol.evaluations == 0
