"""Closed forms, reference solvers (scipy) and the solvers' own promises."""
from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve import Status

from problems import (COS_FIXED_POINT, SOLVERS, cos_problem, distance, linear_answer,
                      linear_map, linear_problem, mean_hw_problem, random_contraction,
                      residual_at, tanh_problem, generator)

# (dtype, rtol given to solve, tolerance on the distance to the answer relative to its size)
PRECISIONS = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
}


def _check_against_answer(sol, p, dtype, rtol):
    assert (sol.status == Status.CONVERGED).all(), sol
    assert sol.converged.all()
    scale = p.answer.abs().max().clamp(min=1.0).item()
    tol = PRECISIONS[dtype][1] * scale
    err = distance(sol.z, p.answer)
    assert err.max().item() <= tol, (err, sol)
    # and the contraction bound: the distance is at most residual / (1 - q) (+ rounding)
    eps = torch.finfo(dtype).eps * 100 * scale
    assert (err <= sol.residual.double() / (1 - p.q) + eps).all(), (err, sol.residual)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_map_matches_linalg_solve(solver, dtype):
    rtol = PRECISIONS[dtype][0]
    p = linear_problem(B=4, n=5, q=0.9, dtype=dtype)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, rtol=rtol, max_iter=1000)
    assert sol.z.dtype == dtype and sol.z.shape == p.z0.shape
    _check_against_answer(sol, p, dtype, rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_cos_fixed_point_is_dottie_number(solver, dtype):
    rtol = PRECISIONS[dtype][0]
    p = cos_problem(B=3, dtype=dtype)
    sol = fpsolve.solve(p.f, p.z0, solver=solver, rtol=rtol, max_iter=1000)
    assert sol.z.shape == (3,)
    _check_against_answer(sol, p, dtype, rtol)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert torch.allclose(sol.z.double(), torch.full((3,), COS_FIXED_POINT, dtype=torch.float64), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_tanh_map_matches_scipy_root(solver, dtype):
    rtol = PRECISIONS[dtype][0]
    p = tanh_problem(B=4, n=6, dtype=dtype)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, rtol=rtol, max_iter=1000)
    _check_against_answer(sol, p, dtype, rtol)


@pytest.mark.parametrize("solver", SOLVERS)
def test_small_nonlinear_system_matches_scipy_root(solver):
    """z = (0.5 sin(z2) + a, 0.4 cos(z1) * b + 0.3 z1 z2 / (1 + z1^2)) per sample, vs scipy."""
    import numpy as np
    from scipy import optimize

    ab = torch.tensor([[0.3, 1.0], [-1.0, 0.5], [2.0, -1.5]], dtype=torch.float64)

    def f(z, x):
        z1, z2 = z[:, 0], z[:, 1]
        a, b = x[:, 0], x[:, 1]
        return torch.stack((0.5 * torch.sin(z2) + a, 0.4 * torch.cos(z1) * b + 0.3 * z1 * z2 / (1 + z1 ** 2)), 1)

    def g_np(z, a, b):
        z1, z2 = z
        return np.array([0.5 * np.sin(z2) + a, 0.4 * np.cos(z1) * b + 0.3 * z1 * z2 / (1 + z1 ** 2)]) - z

    roots = [optimize.root(g_np, np.zeros(2), args=(a, b), tol=1e-12).x for a, b in ab.numpy()]
    assert max(np.abs(g_np(r, a, b)).max() for r, (a, b) in zip(roots, ab.numpy())) < 1e-13
    want = torch.tensor(np.array(roots))
    sol = fpsolve.solve(f, torch.zeros(3, 2, dtype=torch.float64), ab, solver=solver, rtol=1e-12, max_iter=500)
    assert sol.converged.all(), sol
    torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_image_shaped_state(solver):
    p = mean_hw_problem(B=3, C=2, H=4, W=5)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, rtol=1e-11, max_iter=200)
    assert sol.z.shape == (3, 2, 4, 5)
    assert sol.residual.shape == (3,) and sol.iterations.shape == (3,)
    _check_against_answer(sol, p, torch.float64, 1e-11)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_broyden_exact_on_linear_map_within_2n_plus_1_evaluations(n):
    """Good Broyden with memory >= 2n terminates on an n-dim linear map in 2n steps (Gay, 1979)."""
    p = linear_problem(B=3, n=n, q=0.9, seed=10 + n)
    for memory in (2 * n, 2 * n + 3):
        sol = fpsolve.solve(p.f, p.z0, p.x, solver=fpsolve.Broyden(memory=memory), rtol=1e-12, max_iter=100)
        assert sol.converged.all(), sol
        assert (sol.iterations <= 2 * n + 1).all(), sol.iterations
        torch.testing.assert_close(sol.z, p.answer, atol=1e-10, rtol=0)


def test_broyden_exact_even_on_an_expanding_linear_map():
    """Exactness is algebraic, not a contraction property: z -> A z + b with ||A|| = 1.5.

    (A property of the textbook iteration: the line search may backtrack on a rising residual.)"""
    n = 3
    A = random_contraction(2, n, 1.5, seed=42)
    b = torch.randn(2, n, dtype=torch.float64, generator=generator(43))
    want = linear_answer(A, b)
    sol = fpsolve.solve(linear_map, torch.zeros(2, n, dtype=torch.float64), (A, b),
                        solver=fpsolve.Broyden(memory=2 * n, line_search=False), rtol=1e-12, max_iter=2 * n + 1)
    assert sol.converged.all(), sol
    torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=0)


def _slow_symmetric_map(B=4, n=6, q=0.97, seed=7):
    A = random_contraction(B, n, 1.0, seed=seed)
    A = A + A.transpose(1, 2)
    A = A * (q / torch.linalg.matrix_norm(A, ord=2))[:, None, None]
    b = torch.randn(B, n, dtype=torch.float64, generator=generator(seed + 1))
    return A, b


@pytest.mark.parametrize("max_iter", [3, 4, 6])
def test_anderson_beats_plain_iteration_from_the_first_iterations(max_iter):
    A, b = _slow_symmetric_map()
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    plain = fpsolve.solve(linear_map, z0, (A, b), solver="fixed_point", rtol=1e-12, max_iter=max_iter)
    aa = fpsolve.solve(linear_map, z0, (A, b), solver="anderson", rtol=1e-12, max_iter=max_iter)
    assert (aa.iterations == max_iter).all() and (plain.iterations == max_iter).all()
    assert (aa.residual < plain.residual).all(), (aa.residual, plain.residual)


def test_anderson_needs_fewer_iterations_than_plain_on_a_slow_map():
    A, b = _slow_symmetric_map()
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    plain = fpsolve.solve(linear_map, z0, (A, b), solver="fixed_point", rtol=1e-8, max_iter=2000)
    aa = fpsolve.solve(linear_map, z0, (A, b), solver="anderson", rtol=1e-8, max_iter=2000)
    assert plain.converged.all() and aa.converged.all()
    assert (aa.iterations * 3 < plain.iterations).all(), (aa.iterations, plain.iterations)
    # contraction bound: ||z - z*|| <= residual / (1 - q)
    assert (distance(aa.z, linear_answer(A, b)) <= aa.residual / (1 - 0.97) + 1e-12).all()


def test_damped_fixed_point_iteration_tames_an_oscillating_map():
    """z -> -0.95 z + x oscillates slowly; damping 0.5 makes it contract by 0.025."""
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    f = lambda z, x: -0.95 * z + x  # noqa: E731
    z0 = torch.zeros(2, 1, dtype=torch.float64)
    plain = fpsolve.solve(f, z0, x, solver="fixed_point", rtol=1e-10, max_iter=2000)
    damped = fpsolve.solve(f, z0, x, solver=fpsolve.FixedPointIteration(damping=0.5), rtol=1e-10, max_iter=2000)
    assert plain.converged.all() and damped.converged.all()
    assert (damped.iterations * 10 < plain.iterations).all()
    torch.testing.assert_close(damped.z, x / 1.95, atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", [fpsolve.Anderson(m=1), fpsolve.Anderson(m=3, beta=0.8),
                                    fpsolve.Anderson(regularization=1e-8), fpsolve.Broyden(memory=4)],
                         ids=["anderson-m1", "anderson-m3-beta", "anderson-reg", "broyden-mem4"])
def test_solver_objects_with_options(solver):
    p = tanh_problem(B=3, n=5)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, rtol=1e-10, max_iter=500)
    _check_against_answer(sol, p, torch.float64, 1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_atol_alone_halts(solver):
    p = linear_problem(B=3, n=4, q=0.8)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, atol=1e-9, rtol=0.0, max_iter=1000)
    assert sol.converged.all()
    assert (sol.residual <= 1e-9).all()
    assert (distance(sol.z, p.answer) <= 1e-9 / (1 - 0.8) + 1e-12).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_norm_inf_residual_is_largest_entry(solver):
    p = linear_problem(B=4, n=6, q=0.8)
    sol = fpsolve.solve(p.f, p.z0, p.x, solver=solver, rtol=1e-9, norm="inf", max_iter=1000)
    assert sol.converged.all()
    r_inf = residual_at(p.f, sol.z, p.x, norm="inf")
    torch.testing.assert_close(sol.residual, r_inf, rtol=1e-6, atol=1e-15)
    # the criterion held in the inf norm at the returned z
    fz_inf = linear_map(sol.z, p.x).abs().amax(dim=1)
    assert (r_inf <= 1e-9 * fz_inf * (1 + 1e-6)).all()


def test_norm_inf_and_l2_halt_differently():
    """A loose inf-norm tolerance is met earlier than the same l2 tolerance on a wide state."""
    B, n = 2, 400
    x = torch.randn(B, n, dtype=torch.float64, generator=generator(9))
    f = lambda z, x: 0.5 * z + x + 0.0 * z.roll(1, dims=1)  # noqa: E731
    # residual 2^-k ||x||; ||x||_inf / ||x||_2 is ~ 3 / 20 for n = 400
    z0 = torch.zeros(B, n, dtype=torch.float64)
    l2 = fpsolve.solve(f, z0, x, solver="fixed_point", atol=1e-3, rtol=0.0, max_iter=200)
    inf = fpsolve.solve(f, z0, x, solver="fixed_point", atol=1e-3, rtol=0.0, max_iter=200, norm="inf")
    assert l2.converged.all() and inf.converged.all()
    assert (inf.iterations < l2.iterations).all(), (inf.iterations, l2.iterations)
    assert (x.abs().amax(1) * 2.0 ** -(inf.iterations.double() - 1) <= 1e-3 * 1.0001).all()
