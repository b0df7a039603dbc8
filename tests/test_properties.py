"""Property tests on random contractive linear maps z -> A z + b (per-sample A, b)."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import fpsolve  # noqa: E402
from fpsolve import Status  # noqa: E402

from problems import SOLVERS, RowCounter, distance, linear_answer, linear_map, per_sample_norm, residual_at  # noqa: E402


def _random_problem(seed, B, n, q_max):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, n, dtype=torch.float64, generator=g)
    q = q_max * torch.rand(B, dtype=torch.float64, generator=g)          # per-sample factor <= q_max
    A = A * (q / torch.linalg.matrix_norm(A, ord=2))[:, None, None]
    scale = 10.0 ** torch.randint(-2, 3, (B, 1), generator=g).double()
    b = torch.randn(B, n, dtype=torch.float64, generator=g) * scale
    z0 = torch.randn(B, n, dtype=torch.float64, generator=g)
    return A, b, z0, q


SETTINGS = dict(max_examples=30, deadline=None, derandomize=True)


@settings(**SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), B=st.integers(1, 6), n=st.integers(1, 8),
       solver=st.sampled_from(SOLVERS), rtol=st.sampled_from([1e-6, 1e-9]))
def test_random_contractions_always_converge_to_the_answer(seed, B, n, solver, rtol):
    A, b, z0, q = _random_problem(seed, B, n, 0.9)
    f = RowCounter(linear_map)
    sol = fpsolve.solve(f, z0, (A, b), solver=solver, rtol=rtol, max_iter=1000)
    assert (sol.status == Status.CONVERGED).all(), sol
    assert torch.equal(sol.converged, sol.status == Status.CONVERGED)
    want = linear_answer(A, b)
    # contraction bound: ||z - z*|| <= ||f(z) - z|| / (1 - q)
    err = distance(sol.z, want)
    assert (err <= sol.residual / (1 - q) * (1 + 1e-6) + 1e-13).all(), (err, sol.residual, q)
    # ... and the reported residual is the residual at z, which meets the criterion
    r = residual_at(linear_map, sol.z, (A, b))
    torch.testing.assert_close(sol.residual, r, rtol=1e-7, atol=1e-14)
    assert (r <= rtol * per_sample_norm(linear_map(sol.z, (A, b))) * (1 + 1e-7) + 1e-300).all()
    # accounting
    its = int(sol.iterations.sum())
    assert sum(f.rows) == sol.evaluations and its <= sol.evaluations <= its + 3 * B   # check_every 4
    assert all(x >= y for x, y in zip(f.rows, f.rows[1:]))
    assert torch.isfinite(sol.z).all()


@settings(**SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), B=st.integers(1, 6), n=st.integers(1, 8),
       solver=st.sampled_from(SOLVERS), max_iter=st.integers(1, 12),
       atol=st.sampled_from([0.0, 1e-3]), rtol=st.sampled_from([1e-2, 1e-4]),
       halting=st.sampled_from(["sample", "batch"]))
def test_no_sample_reported_converged_is_wrong(seed, B, n, solver, max_iter, atol, rtol, halting):
    """With a tight budget some samples run out; every CONVERGED one is within its tolerance."""
    A, b, z0, q = _random_problem(seed, B, n, 0.95)
    sol = fpsolve.solve(linear_map, z0, (A, b), solver=solver, atol=atol, rtol=rtol,
                        max_iter=max_iter, halting=halting)
    assert ((sol.status == Status.CONVERGED) | (sol.status == Status.MAX_ITER)).all()
    assert (sol.iterations <= max_iter).all() and (sol.iterations >= 1).all()
    want = linear_answer(A, b)
    conv = sol.converged
    r = residual_at(linear_map, sol.z, (A, b))
    fz = per_sample_norm(linear_map(sol.z, (A, b)))
    allowed = atol + rtol * fz
    torch.testing.assert_close(sol.residual, r, rtol=1e-7, atol=1e-14)
    # converged: the criterion holds at z, hence ||z - z*|| <= (atol + rtol ||f(z)||) / (1 - q)
    assert (r[conv] <= allowed[conv] * (1 + 1e-7)).all()
    err = distance(sol.z, want)
    assert (err[conv] <= (allowed[conv] / (1 - q[conv])) * (1 + 1e-6)).all()
    if halting == "sample":
        # budget spent: the criterion never held, in particular not at the returned best iterate
        assert (sol.iterations[~conv] == max_iter).all()
        assert (r[~conv] > allowed[~conv]).all()
    else:
        assert (sol.iterations == sol.iterations[0]).all()


@settings(**SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), B=st.integers(2, 6), n=st.integers(1, 6),
       solver=st.sampled_from(SOLVERS))
def test_solving_a_sample_alone_gives_the_same_answer(seed, B, n, solver):
    """Per-sample halting: a sample's result does not depend on its batch mates."""
    A, b, z0, q = _random_problem(seed, B, n, 0.9)
    full = fpsolve.solve(linear_map, z0, (A, b), solver=solver, rtol=1e-9, max_iter=500)
    i = seed % B
    alone = fpsolve.solve(linear_map, z0[i:i + 1], (A[i:i + 1], b[i:i + 1]), solver=solver, rtol=1e-9, max_iter=500)
    assert full.iterations[i] == alone.iterations[0]
    assert full.status[i] == alone.status[0]
    torch.testing.assert_close(full.z[i:i + 1], alone.z, rtol=1e-9, atol=1e-12)
