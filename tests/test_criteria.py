"""Halting criteria as objects (Residual, Stable, OutputKL, HaltHead) on closed-form maps.

The map z -> 0.5 z + x from z0 = 0 has the iterates z_k = 2x (1 - 0.5^k), so the pass at
which each criterion fires is known in advance.
"""
from __future__ import annotations

import math

import pytest
import torch

import fpsolve
from fpsolve import Status

from problems import SOLVERS

X = torch.tensor([[0.4], [0.45]], dtype=torch.float64)   # fixed points 0.8, 0.9


def halve(z, x):
    return 0.5 * z + x


def iterate_closed_form(x: float, k: int) -> float:
    return 2 * x * (1 - 0.5 ** k)


def two_class(z):
    """Logits [B, 1, 2]: class 0 wins when z > 0.5."""
    return torch.stack((z, torch.full_like(z, 0.5)), dim=-1)


def test_stable_halts_when_the_argmax_has_not_changed_for_patience_passes():
    # The criterion reads the newest state z_k = f(z_(k-1)) at pass k. x = 0.4: z_1.. = .4, .6,
    # .7, .75 -> argmax 1, 0, 0, 0: with patience 2 it halts at pass 4 and returns z_4; x = 0.45:
    # z = .45, .675, .7875, ... -> 1, 0, 0, 0: also at pass 4.
    sol = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), X, solver="fixed_point",
                        criterion=fpsolve.Stable(two_class, patience=2))
    assert sol.status.tolist() == [Status.HALTED, Status.HALTED]
    assert sol.iterations.tolist() == [4, 4]
    want = torch.tensor([[iterate_closed_form(0.4, 4)], [iterate_closed_form(0.45, 4)]], dtype=torch.float64)
    torch.testing.assert_close(sol.z, want)
    assert sol.converged.all()
    # the residual is the last step's size, ||z_4 - z_3||
    before = torch.tensor([[iterate_closed_form(0.4, 3)], [iterate_closed_form(0.45, 3)]], dtype=torch.float64)
    torch.testing.assert_close(sol.residual, (sol.z - before).abs().squeeze(1))


def test_stable_with_patience_one_stops_at_the_first_repeat():
    sol = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), X, solver="fixed_point",
                        criterion=fpsolve.Stable(two_class))
    assert sol.iterations.tolist() == [3, 3]      # argmax(z_2) == argmax(z_3) for both


def test_output_kl_matches_a_hand_computed_sequence():
    tol = 1e-4
    readout = lambda z: torch.stack((z, torch.zeros_like(z)), dim=-1)  # noqa: E731
    sol = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), X, solver="fixed_point",
                        criterion=fpsolve.OutputKL(readout, tol), max_iter=100)
    for i, x in enumerate([0.4, 0.45]):
        prev = None
        for k in range(1, 100):                   # pass k reads z_k
            z = iterate_closed_form(x, k)
            p = torch.softmax(torch.tensor([z, 0.0], dtype=torch.float64), 0)
            if prev is not None and float((p * (p.log() - prev.log())).sum()) <= tol:
                break
            prev = p
        assert sol.iterations[i] == k
        assert sol.status[i] == Status.HALTED
        assert math.isclose(float(sol.z[i]), iterate_closed_form(x, k), rel_tol=1e-12)


def test_halt_head_stops_when_the_probability_crosses_the_threshold():
    head = lambda z: (z.squeeze(1) - 0.69) * 100  # noqa: E731   halts once z >= 0.69
    sol = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), X, solver="fixed_point",
                        criterion=fpsolve.HaltHead(head))
    # x = 0.4: z_3 = 0.7 is the first >= 0.69; x = 0.45: z_2 = 0.675, z_3 = 0.7875: read at pass 3
    assert sol.iterations.tolist() == [3, 3]
    torch.testing.assert_close(sol.z, torch.tensor([[0.7], [0.7875]], dtype=torch.float64))
    assert sol.status.tolist() == [Status.HALTED, Status.HALTED]


@pytest.mark.parametrize("solver", SOLVERS)
def test_residual_criterion_object_equals_the_keyword_rule(solver):
    a = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), X, solver=solver, rtol=1e-9, norm="inf")
    b = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), X, solver=solver,
                      criterion=fpsolve.Residual(rtol=1e-9, norm="inf"))
    assert torch.equal(a.z, b.z) and torch.equal(a.iterations, b.iterations)
    assert b.status.tolist() == [Status.CONVERGED] * 2


def test_a_criterion_halting_a_diverged_row_gives_diverged():
    x = torch.tensor([[0.4], [float("nan")]], dtype=torch.float64)
    sol = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point",
                        criterion=fpsolve.HaltHead(lambda z: torch.full_like(z.squeeze(1), 10.0)))
    assert sol.status.tolist() == [Status.HALTED, Status.DIVERGED]
    assert torch.isfinite(sol.z).all()


@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_criteria_work_with_both_haltings_and_tuple_states(halting):
    def f(z, x):
        return (0.5 * z[0] + x, 0.5 * z[1] + 2 * x)
    z0 = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    readout = lambda z: two_class(z[0])  # noqa: E731
    sol = fpsolve.solve(f, z0, X, solver="fixed_point", halting=halting,
                        criterion=fpsolve.Stable(readout, patience=2))
    assert sol.iterations.tolist() == [4, 4]
    assert isinstance(sol.z, tuple)


def test_bad_criteria_are_clear_errors():
    with pytest.raises(TypeError, match="readout"):
        fpsolve.Stable(3)
    with pytest.raises(ValueError, match="patience"):
        fpsolve.Stable(two_class, patience=0)
    with pytest.raises(ValueError, match="tol"):
        fpsolve.OutputKL(two_class, tol=-1)
    with pytest.raises(ValueError, match="threshold"):
        fpsolve.HaltHead(lambda z: z, threshold=1.5)
    with pytest.raises(ValueError, match="both 0"):
        fpsolve.Residual(rtol=0)
    with pytest.raises(TypeError, match="class"):
        fpsolve.solve(halve, torch.zeros(2, 1), X.float(), criterion=fpsolve.Stable)
    with pytest.raises(TypeError, match="criterion"):
        fpsolve.solve(halve, torch.zeros(2, 1), X.float(), criterion="residual")
    with pytest.raises(ValueError, match="one place"):
        fpsolve.solve(halve, torch.zeros(2, 1), X.float(), rtol=1e-6, criterion=fpsolve.Residual(rtol=1e-3))
    with pytest.raises(ValueError, match="readout"):
        fpsolve.solve(halve, torch.zeros(2, 1), X.float(), criterion=fpsolve.Stable(lambda z: z[:1]))


def test_implicit_backward_warns_for_a_halted_sample_that_is_not_at_a_fixed_point():
    x = torch.tensor([[0.4], [0.45]], dtype=torch.float64, requires_grad=True)
    sol = fpsolve.solve(halve, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point",
                        criterion=fpsolve.Stable(two_class, patience=2))
    assert sol.status.tolist() == [Status.HALTED, Status.HALTED]
    with pytest.warns(fpsolve.ConvergenceWarning, match="not at one"):
        sol.z.sum().backward()
    # the implicit gradient is that of the fixed point z* = 2x, although z is not there
    torch.testing.assert_close(x.grad, torch.full((2, 1), 2.0, dtype=torch.float64), rtol=1e-3, atol=0)


def test_deq_takes_a_criterion():
    layer = fpsolve.DEQ(halve, solver="fixed_point", criterion=fpsolve.Stable(two_class, patience=2))
    z, sol = layer(X, z0=torch.zeros(2, 1, dtype=torch.float64))
    assert sol.status.tolist() == [Status.HALTED] * 2 and sol.iterations.tolist() == [4, 4]
    with pytest.raises(TypeError, match="criterion"):
        fpsolve.DEQ(halve, criterion="stable")
