"""Per-sample halting (halted rows are never evaluated again) and halting="batch"."""
from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve import Status

from problems import SOLVERS, RowCounter, linear_map, linear_problem, residual_at, generator


def _mixed_batch(B=6, n=4):
    """Per-sample scalar contraction factors from easy (0.05) to hard (0.95), as z -> a z + b."""
    a = torch.linspace(0.05, 0.95, B, dtype=torch.float64)
    b = torch.randn(B, n, dtype=torch.float64, generator=generator(11))
    A = a[:, None, None] * torch.eye(n, dtype=torch.float64)
    return A, b, b / (1 - a)[:, None]


@pytest.mark.parametrize("solver", SOLVERS)
def test_halted_rows_are_not_passed_to_f_again(solver):
    A, b, want = _mixed_batch()
    f = RowCounter(linear_map)
    sol = fpsolve.solve(f, torch.zeros(6, 4, dtype=torch.float64), (A, b), solver=solver,
                        rtol=1e-10, max_iter=500, check_every=1)
    assert sol.converged.all(), sol
    torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=1e-7)
    assert isinstance(sol.evaluations, int)
    assert sum(f.rows) == sol.evaluations == int(sol.iterations.sum())
    assert all(a >= b for a, b in zip(f.rows, f.rows[1:])), f.rows
    assert f.rows[0] == 6 and f.rows[-1] >= 1
    # the number of calls is the largest iteration count: the last call serves the slowest sample
    assert len(f.rows) == int(sol.iterations.max())
    # at call t (0-based), exactly the samples with iterations > t are passed
    for t, rows in enumerate(f.rows):
        assert rows == int((sol.iterations > t).sum()), (t, rows, sol.iterations)


def test_mixed_easy_and_hard_samples_get_different_iteration_counts():
    A, b, want = _mixed_batch()
    sol = fpsolve.solve(linear_map, torch.zeros(6, 4, dtype=torch.float64), (A, b),
                        solver="fixed_point", rtol=1e-10, max_iter=1000)
    assert sol.converged.all()
    it = sol.iterations
    assert it.dtype == torch.int64 and it.shape == (6,)
    # harder (larger contraction factor) needs strictly more plain iterations
    assert (it[1:] > it[:-1]).all(), it
    assert it[0] < 15 and it[-1] > 200
    torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("solver", SOLVERS)
def test_each_row_is_evaluated_exactly_iterations_times(solver):
    """x carries each sample's id; f logs which ids it sees. No id appears after it halted."""
    A, b, want = _mixed_batch(B=5, n=3)
    ids = torch.arange(5)
    seen = []

    def f(z, x):
        A, b, i = x
        assert A.shape[0] == b.shape[0] == i.shape[0] == z.shape[0]
        seen.append(i.tolist())
        return linear_map(z, (A, b))

    sol = fpsolve.solve(f, torch.zeros(5, 3, dtype=torch.float64), (A, b, ids), solver=solver,
                        rtol=1e-10, max_iter=500, check_every=1)
    assert sol.converged.all()
    for s in range(5):
        calls = [t for t, row in enumerate(seen) if s in row]
        assert len(calls) == int(sol.iterations[s])
        assert calls == list(range(len(calls))), (s, calls)   # consecutive from the start
    torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_halting_gives_every_sample_the_same_iterations(solver):
    A, b, want = _mixed_batch()
    f = RowCounter(linear_map)
    sol = fpsolve.solve(f, torch.zeros(6, 4, dtype=torch.float64), (A, b), solver=solver,
                        rtol=1e-10, max_iter=1000, halting="batch", record=True)
    assert sol.converged.all(), sol
    assert (sol.iterations == sol.iterations[0]).all()
    assert set(f.rows) == {6}, "with halting='batch' f always receives the full batch"
    assert len(f.rows) == int(sol.iterations[0])
    assert sol.evaluations == 6 * int(sol.iterations[0]) == sum(f.rows)
    torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=1e-7)
    # each sample's z is its own best iterate: the smallest residual of its own trace
    torch.testing.assert_close(sol.residual, torch.nan_to_num(sol.trace, nan=float("inf")).amin(0))
    torch.testing.assert_close(sol.residual, residual_at(linear_map, sol.z, (A, b)), rtol=1e-6, atol=1e-15)


def test_batch_halting_keeps_improving_easy_samples_and_matches_per_sample_answers():
    A, b, want = _mixed_batch()
    z0 = torch.zeros(6, 4, dtype=torch.float64)
    per = fpsolve.solve(linear_map, z0, (A, b), solver="fixed_point", rtol=1e-8, max_iter=1000)
    bat = fpsolve.solve(linear_map, z0, (A, b), solver="fixed_point", rtol=1e-8, max_iter=1000, halting="batch")
    assert per.converged.all() and bat.converged.all()
    assert (bat.iterations == per.iterations.max()).all()
    # easy samples were iterated longer under "batch": their best iterate is at least as good
    assert (bat.residual <= per.residual).all()
    assert (bat.residual[0] < per.residual[0])
    torch.testing.assert_close(bat.z, want, atol=1e-9, rtol=1e-5)


def test_batch_halting_with_a_mixing_map():
    """A map that mixes samples (BatchNorm-like centring) works with halting='batch'."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator(21))

    def f(z, x):
        assert z.shape[0] == 5
        return 0.5 * (z - z.mean(0, keepdim=True)) + x

    # fixed point: z - 0.5 (z - mean z) = x  => mean z = mean x, z = 2 x - mean x
    want = 2 * x - x.mean(0, keepdim=True)
    for solver in SOLVERS:
        sol = fpsolve.solve(f, torch.zeros(5, 3, dtype=torch.float64), x, solver=solver,
                            rtol=1e-11, max_iter=500, halting="batch")
        assert sol.converged.all()
        torch.testing.assert_close(sol.z, want, atol=1e-9, rtol=0)


def test_map_that_mixes_samples_under_per_sample_halting_raises_clearly():
    """If f returns a full-batch tensor after rows were dropped, the error says so."""
    A, b, _ = _mixed_batch(B=4, n=2)

    def f(z, x):
        out = linear_map(z, x)
        if z.shape[0] < 4:   # pretends a closed-over per-sample tensor of the full batch
            out = torch.cat([out, out[: 4 - z.shape[0]]])
        return out

    with pytest.raises(ValueError, match="halting"):
        fpsolve.solve(f, torch.zeros(4, 2, dtype=torch.float64), (A, b), solver="fixed_point",
                      rtol=1e-10, max_iter=500)


def test_max_iter_caps_every_sample():
    p = linear_problem(B=3, n=4, q=0.99)
    f = RowCounter(p.f)
    sol = fpsolve.solve(f, p.z0, p.x, solver="fixed_point", rtol=1e-12, max_iter=7)
    assert (sol.iterations == 7).all()
    assert len(f.rows) == 7 and sol.evaluations == 21 == sum(f.rows)
    assert (sol.status == Status.MAX_ITER).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_max_iter_one_is_a_single_evaluation(solver):
    p = linear_problem(B=3, n=4, q=0.9)
    f = RowCounter(p.f)
    sol = fpsolve.solve(f, p.z0, p.x, solver=solver, rtol=1e-12, max_iter=1)
    assert f.rows == [3]
    assert (sol.iterations == 1).all() and sol.evaluations == 3
    assert (sol.status == Status.MAX_ITER).all()
    torch.testing.assert_close(sol.z, p.z0)   # the only iterate with a known residual
    torch.testing.assert_close(sol.residual, residual_at(p.f, p.z0, p.x))


def test_already_at_fixed_point_halts_after_one_evaluation():
    p = linear_problem(B=3, n=4, q=0.9)
    f = RowCounter(p.f)
    sol = fpsolve.solve(f, p.answer.clone(), p.x, rtol=1e-8, max_iter=50)
    assert sol.converged.all()
    assert f.rows == [3] and (sol.iterations == 1).all()
