"""Unroll() through Anderson and Broyden at degenerate steps: finite gradients (issue 19, item 2).

`backward=Unroll()` records the solvers' own algebra. A sample that sits exactly at its fixed
point while it is still iterated (halting="batch", or a read-out criterion such as Stable
keeping it going), or whose steps are at rounding level, makes a degenerate step: Anderson's
Gram system is singular (a zero history column) and Broyden's update has a zero (or tiny)
denominator. Their forward values were always finite (the step falls back to a plain one, or
skips the update); their backward was NaN (solve_ex's and reciprocal's backward through the
degenerate numbers, even with a zero incoming gradient). The guards keep the values bit for
bit (tests/test_op_counts.py's problems, no-grad op counts unchanged) and make the
degenerate step's backward zero: it differentiates as the plain step it takes.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fpsolve
from fpsolve.solvers._base import recorded_reciprocal, recorded_solve

pytestmark = pytest.mark.usefixtures("one_thread")

F32, F64 = torch.float32, torch.float64
SOLVERS = {
    "anderson": fpsolve.Anderson(),
    "anderson-no-safeguard": fpsolve.Anderson(safeguard=False),
    "broyden": fpsolve.Broyden(),
    "broyden-no-line-search": fpsolve.Broyden(line_search=False),
}
#: Rows 0-1 saturate tanh (f = ±1 exactly from the first step on: a fixed point where f is
#: flat in x); rows 2-3 are smooth and need a few steps.
X = [[-140.0, 60.0], [40.0, -90.0], [0.3, -0.2], [0.6, 0.4]]


def readout(z):
    return torch.cat((z, -z), 1)   # two classes per coordinate: Stable needs >= 2


def options(mode):
    if mode == "batch":
        return {"halting": "batch", "max_iter": 40}
    return {"max_iter": 12, "criterion": fpsolve.Stable(readout, patience=3)}


def solve_tanh(c, x, solver, mode):
    def f(z, x):
        return torch.tanh(0.5 * z + c * x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fpsolve.ConvergenceWarning)
        return fpsolve.solve(f, torch.zeros_like(x), x, solver=solver, backward=fpsolve.Unroll(), **options(mode))


def grads(x_rows, solver, mode, dtype):
    c = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    x = torch.tensor(x_rows, dtype=dtype, requires_grad=True)
    sol = solve_tanh(c, x, solver, mode)
    sol.z.sum().backward()
    return sol, x.grad, c.grad


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("mode", ["batch", "stable"])
def test_saturated_rows_give_finite_gradients_and_leave_the_others_alone(mode, solver, dtype):
    sol, gx, gc = grads(X, SOLVERS[solver], mode, dtype)
    assert torch.isfinite(sol.z).all()
    assert torch.isfinite(gx).all() and torch.isfinite(gc), (gx, gc)      # was NaN
    assert (gx[:2] == 0).all(), gx                                         # f is flat in x there
    # The smooth rows: the gradients they get solved without the saturated rows.
    alone, gx2, gc2 = grads(X[2:], SOLVERS[solver], mode, dtype)
    assert alone.iterations.tolist() == sol.iterations[2:].tolist()
    torch.testing.assert_close(gx[2:], gx2)
    torch.testing.assert_close(gc, gc2)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("mode", ["batch", "stable"])
def test_saturated_rows_gradients_equal_finite_differences(mode, solver):
    """float64: the unrolled gradient in c equals central differences of the same (recorded) solve."""
    sol, _, gc = grads(X, SOLVERS[solver], mode, F64)
    h = 1e-4
    x = torch.tensor(X, dtype=F64)
    plus = solve_tanh(torch.tensor(1.0 + h, dtype=F64), x, SOLVERS[solver], mode)
    minus = solve_tanh(torch.tensor(1.0 - h, dtype=F64), x, SOLVERS[solver], mode)
    assert plus.iterations.tolist() == minus.iterations.tolist() == sol.iterations.tolist()
    fd = (plus.z.sum() - minus.z.sum()) / (2 * h)
    torch.testing.assert_close(gc, fd.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("mode", ["batch", "stable"])
def test_steps_at_an_exact_fixed_point_differentiate_as_plain_steps(mode, solver, dtype):
    """Rows started exactly at the fixed point of z -> z/2 + c x (every residual 0): every step is
    degenerate, each takes the plain step z+ = f(z), and the gradient is that of a hand loop of
    plain steps: x (1 + 1/2 + ... + 2^-(k-1)) after k of them (exact in binary)."""
    c = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    x = torch.tensor([[0.75, -0.5], [0.25, 1.0], [0.3, -0.2]], dtype=dtype)
    z0 = torch.cat((2 * x[:2], torch.zeros(1, 2, dtype=dtype)))   # row 2 starts away (and keeps a batch going)
    def f(z, x):
        return torch.cat((0.5 * z[:2] + c * x[:2], torch.tanh(0.9 * z[2:] + c * x[2:])))

    sol = fpsolve.solve(f, z0, x, solver=SOLVERS[solver], backward=fpsolve.Unroll(), **options(mode))
    assert torch.equal(sol.z[:2].detach(), z0[:2])
    (gc,) = torch.autograd.grad(sol.z[:2].sum(), c)
    hand = []
    for k in range(1, int(sol.iterations[:2].max()) + 1):
        cc, z = c.detach().clone().requires_grad_(), z0[:2]
        for _ in range(k):
            z = 0.5 * z + cc * x[:2]
        hand.append(float(torch.autograd.grad(z.sum(), cc)[0]))
    assert float(gc) in hand, (float(gc), hand)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_recorded_solve_keeps_the_values_and_zeroes_the_singular_backward(dtype):
    A = torch.tensor([[[2.0, 1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 1.0]], [[1.0, 0.5], [0.5, 0.0]]], dtype=dtype)
    b = torch.tensor([[[1.0], [2.0]], [[0.0], [1.0]], [[1.0], [-1.0]]], dtype=dtype)
    A.requires_grad_()
    b.requires_grad_()
    want = torch.linalg.solve_ex(A.detach(), b.detach())[0].nan_to_num(0.0, 0.0, 0.0)
    got = recorded_solve(A, b)
    assert torch.equal(got.detach(), want)                  # row 1 singular: its values kept as they were
    got.sum().backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(b.grad).all()
    assert (A.grad[1] == 0).all() and (b.grad[1] == 0).all()
    A2, b2 = A.detach()[[0, 2]].requires_grad_(), b.detach()[[0, 2]].requires_grad_()
    torch.linalg.solve_ex(A2, b2)[0].sum().backward()
    assert torch.equal(A.grad[[0, 2]], A2.grad) and torch.equal(b.grad[[0, 2]], b2.grad)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_recorded_reciprocal_keeps_the_values_and_never_sends_nan_back(dtype):
    tiny = torch.finfo(dtype).max ** -0.5 / 4                 # 1 / tiny² overflows
    d = torch.tensor([2.0, 0.0, -4.0, tiny, float("inf")], dtype=dtype, requires_grad=True)
    ok = torch.tensor([True, False, False, True, True])
    got = recorded_reciprocal(d, ok)
    assert torch.equal(got.detach(), torch.where(ok, d.detach().reciprocal(), 0.0))
    (grad,) = torch.autograd.grad(got, d, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0], dtype=dtype))
    assert torch.isfinite(grad).all(), grad
    assert grad.tolist() == [-0.25, 0.0, 0.0, 0.0, -0.0]


def test_batch_unroll_after_a_death_keeps_one_trace_row_per_pass():
    """Found by the property test (seed 41): under halting="batch", Unroll() records the batch
    again once a row died (an f mixing rows by their mean: one row's growth reaches all); the
    trace must still hold one row per pass of the batch's count."""
    A = torch.tensor([0.9844, -0.9844, -2.0, 0.9844, -0.9844], dtype=torch.float64)[:, None]
    b = torch.tensor([-0.0013986, 0.00040335, 0.00083803, -0.00071926, -0.00040334], dtype=torch.float64)[:, None]
    z0 = torch.tensor([-0.59664, 0.18204, -0.85667, 1.10060, -1.07119], dtype=torch.float64)[:, None]
    c = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    f = lambda z, x: A * z + c * x + 0.25 * z.mean(dim=0, keepdim=True)   # noqa: E731
    head = fpsolve.HaltHead(lambda z: 4.0 * z.sum(1).float(), threshold=0.3)
    sol = fpsolve.solve(f, z0, b, solver="fixed_point", halting="batch", backward="unroll", record=True,
                        criterion=head, rtol=1e-8, max_iter=27)
    assert (sol.status == int(fpsolve.Status.DIVERGED)).any()
    assert sol.trace.shape == (int(sol.iterations.max()), 5)
