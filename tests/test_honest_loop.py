"""Regression tests for issue 10's loop defects: each reproduction from the issue, then the fix."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fpsolve
from fpsolve import Status

from problems import SOLVERS


def _criterion_ratio(f, sol, x, rtol, atol=0.0, norm="l2"):
    """||f(z) - z|| / (atol + rtol ||f(z)||) recomputed at the returned z (<= 1: criterion holds)."""
    with torch.no_grad():
        fz = f(sol.z, x)
    dims = tuple(range(1, fz.ndim))
    if norm == "l2":
        r, s = torch.linalg.vector_norm(fz - sol.z, dim=dims), torch.linalg.vector_norm(fz, dim=dims)
    else:
        r, s = (fz - sol.z).abs().amax(dim=dims), fz.abs().amax(dim=dims)
    return r, r / (atol + rtol * s)


def test_batch_halting_with_a_sample_mixing_map_is_honest_at_the_returned_z():
    """Defect 1: attention across the batch; every status must hold at sol.z."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4).eval()    # not batch_first: attends across the batch
    ln = nn.LayerNorm(16)

    def f(z, x):
        u = z + x
        return ln(u + 0.5 * mha(u, u, u)[0])

    x = torch.randn(8, 5, 16) * torch.linspace(0.2, 3, 8)[:, None, None]
    with torch.no_grad():
        sol = fpsolve.solve(f, torch.zeros_like(x), x, halting="batch")
        r, ratio = _criterion_ratio(f, sol, x, 1e-4)
    conv = sol.status == Status.CONVERGED
    assert bool((ratio[conv] <= 1 + 1e-4).all()), ratio
    torch.testing.assert_close(sol.residual, r, rtol=1e-4, atol=1e-6)
    assert torch.equal(sol.iterations, torch.full((8,), int(sol.iterations[0])))


def _spirals():
    def rot(a, s):
        return s * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    A = torch.stack([rot(1.24, 0.87), rot(0.95, 0.92)])
    b = torch.tensor([[1.03, 0.62], [1.06, -0.53]], dtype=torch.float64)
    z0 = torch.tensor([[0.54, -3.43], [4.07, 0.39]], dtype=torch.float64)
    return (lambda z, x: torch.einsum("bij,bj->bi", x[0], z) + x[1]), z0, (A, b)


@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_a_converged_row_is_never_moved_off_its_criterion(halting):
    """Defect 2: two contracting spirals at rtol 0.65; 'batch' used to return [0.88, 3.54]."""
    f, z0, x = _spirals()
    sol = fpsolve.solve(f, z0, x, solver="fixed_point", rtol=0.65, halting=halting)
    r, ratio = _criterion_ratio(f, sol, x, 0.65)
    for i in range(2):
        if sol.status[i] == Status.CONVERGED:
            assert ratio[i] <= 1 + 1e-12
    torch.testing.assert_close(sol.residual, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_bounded_map_starting_near_zero_is_not_diverged(solver):
    """Defect 3: tanh(2z + x) with x = 1e-9 used to be DIVERGED at z0 (limit relative to 1e-9)."""
    f = lambda z, x: torch.tanh(2 * z + x)  # noqa: E731
    x = torch.tensor([[1e-6], [1e-9]], dtype=torch.float64)
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver=solver, rtol=1e-10, max_iter=300)
    assert (sol.status != Status.DIVERGED).all(), sol.status
    assert (sol.status == Status.CONVERGED).all()
    torch.testing.assert_close(f(sol.z, x), sol.z, rtol=1e-8, atol=1e-15)
    if solver == "fixed_point":
        # tanh(2z) = z has the attracting roots ±0.9575; a positive push goes to the positive
        # one (the accelerated solvers may find the repelling root near 0, also a root)
        torch.testing.assert_close(sol.z, torch.full((2, 1), 0.95750402, dtype=torch.float64), rtol=1e-6, atol=0)


def test_growth_without_bound_is_still_diverged():
    f = lambda z, x: x * z + 1  # noqa: E731
    x = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point", max_iter=200)
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED]
    assert torch.isfinite(sol.z).all()


@pytest.mark.parametrize("backward", [fpsolve.Phantom(steps=3, damping=0.8), fpsolve.Unroll(steps=4),
                                      fpsolve.Unroll(), fpsolve.Implicit()])
@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_a_diverged_row_never_returns_nan_in_any_backward_mode(backward, halting):
    """Defect 4: one NaN in x gave a NaN row in sol.z with Phantom and Unroll(steps=k)."""
    W = (0.4 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = float("nan")
    f = lambda z, x: torch.tanh(z @ W + x)  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(4, 3, dtype=torch.float64), x, backward=backward, halting=halting,
                        rtol=1e-8, max_iter=100)
    assert sol.status[2] == Status.DIVERGED
    assert torch.isfinite(sol.z).all()
    if halting == "sample" and not isinstance(backward, fpsolve.Implicit) and backward.steps is not None:
        sol.z.sum().backward()
        assert torch.isfinite(W.grad).all(), "a diverged row must not poison a shared parameter"


class MyErr(Exception):
    pass


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_exception_from_f_keeps_its_type_after_rows_halted(solver):
    """Defect 6: it became a RuntimeError once some rows had halted."""
    x = torch.tensor([[0.0], [0.9]], dtype=torch.float64)
    z0 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)   # row 0 starts at its fixed point

    def f(z, x):
        if z.shape[0] < 2:
            raise MyErr("boom")
        return x * z + 1

    with pytest.raises(MyErr, match="boom") as info:
        fpsolve.solve(f, z0, x, solver=solver, rtol=1e-6)
    assert any("still active" in n for n in getattr(info.value, "__notes__", []))


def test_an_exception_from_f_at_its_first_call_reaches_the_caller_unchanged():
    def f(z, x):
        raise KeyError("missing")
    with pytest.raises(KeyError):
        fpsolve.solve(f, torch.zeros(2, 1), torch.ones(2, 1))


@pytest.mark.parametrize("bad", [None, "tuple", "int", "shape"])
@pytest.mark.parametrize("structure", ["tensor", "tuple"])
def test_a_bad_return_at_a_later_pass_is_a_clear_error(bad, structure):
    """Defect 7: None, a tuple or an integer tensor at pass 3 gave raw AttributeError etc."""
    calls = {"n": 0}

    def f(z, x):
        calls["n"] += 1
        out = tuple(0.5 * t + 1 for t in z) if structure == "tuple" else 0.5 * z + 1
        if calls["n"] < 3:
            return out
        first = out[0] if structure == "tuple" else out
        if bad is None:
            return None
        if bad == "tuple":
            return (first, first, first)
        if bad == "int":
            return tuple(o.long() for o in out) if structure == "tuple" else out.long()
        return tuple(o[:, :1] for o in out) if structure == "tuple" else out[:, :1]

    z0 = torch.zeros(3, 2, dtype=torch.float64)
    if structure == "tuple":
        z0 = (z0, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises((TypeError, ValueError), match=r"f\b|must"):
        fpsolve.solve(f, z0, torch.ones(3, 1, dtype=torch.float64), solver="fixed_point", rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_low_precision_statuses_hold_at_the_returned_values(dtype, solver, halting):
    """Defect 8: 52 of 256 bfloat16 samples failed the criterion at the rounded sol.z.

    What holds (documented in solve's docstring): the criterion and sol.residual, computed in
    float32 from the returned low-precision z and f's low-precision output at it.
    """
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(32, 32, generator=g) * 0.6 / math.sqrt(32)).to(dtype)
    x = torch.randn(256, 32, generator=g).to(dtype)
    f = lambda z, x: torch.tanh(z @ W + x)  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(256, 32, dtype=dtype), x, solver=solver, rtol=1e-2,
                        max_iter=60, halting=halting)
    assert sol.z.dtype == dtype
    fz = f(sol.z, x).float()
    z = sol.z.float()
    r = torch.linalg.vector_norm(fz - z, dim=1)
    torch.testing.assert_close(sol.residual.float(), r, rtol=1e-5, atol=1e-6)
    conv = sol.status == Status.CONVERGED
    assert conv.sum() > 200
    assert bool((r[conv] <= 1e-2 * torch.linalg.vector_norm(fz, dim=1)[conv] * (1 + 1e-6)).all())


def test_empty_batch_checks_f_once_and_prints_cleanly():
    calls = []
    sol = fpsolve.solve(lambda z: calls.append(z.shape) or 0.5 * z, torch.zeros(0, 3))
    assert calls == [torch.Size([0, 3])]
    assert "B=0" in repr(sol)
    with pytest.raises(ValueError, match="shape"):
        fpsolve.solve(lambda z: z[:, :1], torch.zeros(0, 3))


def test_a_warm_start_made_under_inference_mode_works_in_a_training_forward():
    W = (0.5 * torch.eye(3)).requires_grad_()
    x = torch.randn(4, 3)
    f = lambda z, x: torch.tanh(z @ W + x)  # noqa: E731
    with torch.inference_mode():
        warm = fpsolve.solve(f, torch.zeros(4, 3), x).z
    sol = fpsolve.solve(f, warm, x)
    sol.z.sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_numpy_scalars_are_the_numbers_they_are():
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    x = torch.ones(2, 3, dtype=torch.float64)
    sol = fpsolve.solve(f, torch.zeros_like(x), x, max_iter=np.int64(20), rtol=np.float32(1e-6))
    assert sol.converged.all()
    with pytest.raises(ValueError, match="max_iter"):
        fpsolve.solve(f, torch.zeros_like(x), x, max_iter=np.float64(20.0))
    with pytest.raises(TypeError, match="record"):
        fpsolve.solve(f, torch.zeros_like(x), x, record="yes")


@pytest.mark.parametrize("backward", [fpsolve.Phantom(steps=3, damping=0.8), fpsolve.Unroll(steps=3)])
def test_a_diverged_row_does_not_spread_nan_through_phantom_passes_of_a_mixing_map(backward):
    """halting="batch" with a map that mixes rows: the extra passes keep the dead row frozen."""
    W = (0.3 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    f = lambda z, x: torch.tanh(z @ W + x - 0.5 * z.mean(0, keepdim=True))  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(4, 3, dtype=torch.float64), x, halting="batch", backward=backward,
                        rtol=1e-8, max_iter=100)
    assert sol.status[1] == Status.DIVERGED and (sol.status[[0, 2, 3]] == Status.CONVERGED).all()
    assert torch.isfinite(sol.z).all()


def test_batch_halting_a_row_that_blows_up_at_the_last_pass_reports_its_returned_residual():
    """The row goes back to its last finite iterate, and its residual is the one measured there."""
    x = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    f = lambda z, x: x * z + 1  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point", halting="batch",
                        rtol=1e-10, max_iter=200)
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED]
    torch.testing.assert_close(sol.residual[1], (f(sol.z, x) - sol.z).abs()[1, 0])
