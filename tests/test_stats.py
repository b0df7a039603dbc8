"""`Solution.stats()`, the flat dict for loggers, and `DEQ.last_solution`.

Every figure is checked against the same figure computed by hand (numpy) from the Solution's
own per-sample fields, on batches that mix CONVERGED, MAX_ITER, DIVERGED and HALTED samples.
"""
from __future__ import annotations

import copy
import csv
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import fpsolve
from fpsolve import Solution, Status

from problems import generator, linear_map, random_contraction

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
REQUIRED = ("iterations_mean", "iterations_max", "converged_fraction", "max_iter_fraction",
            "diverged_fraction", "halted_fraction", "residual_max", "residual_median", "evaluations")
ADJOINT = ("adjoint_iterations_mean", "adjoint_converged_fraction")
HALTED = 3   # Status.HALTED's code (the member is added to Status in parallel)


def _mixed_batch(B=6, n=4, max_iter=25):
    """Per-sample linear maps, contraction 0.1 .. 0.97 (the slow ones run out of budget), and
    one sample whose offset is nan (DIVERGED)."""
    A = random_contraction(B, n, 1.0, seed=1) * torch.linspace(0.1, 0.97, B, dtype=F64)[:, None, None]
    b = torch.randn(B, n, dtype=F64, generator=generator(2))
    b[2] = math.nan
    return fpsolve.solve(linear_map, torch.zeros(B, n, dtype=F64), (A, b), solver="fixed_point",
                         rtol=1e-8, max_iter=max_iter)


def _by_hand(sol):
    it = sol.iterations.numpy().astype(float)
    st = sol.status.numpy()
    r = sol.residual.double().numpy()
    r = r[np.isfinite(r)]
    return {
        "iterations_mean": it.mean(), "iterations_min": it.min(), "iterations_max": it.max(),
        "converged_fraction": np.mean(st == 0), "max_iter_fraction": np.mean(st == 1),
        "diverged_fraction": np.mean(st == 2), "halted_fraction": np.mean(st == HALTED),
        "residual_median": np.quantile(r, 0.5), "residual_p90": np.quantile(r, 0.9),
        "residual_max": r.max(), "evaluations": float(sol.evaluations), "batch_size": len(st),
    }


def test_stats_of_a_mixed_batch_match_the_per_sample_fields():
    sol = _mixed_batch()
    counts = {s: int((sol.status == s).sum()) for s in Status}
    assert counts[Status.CONVERGED] >= 2 and counts[Status.MAX_ITER] >= 1 and counts[Status.DIVERGED] == 1
    got = sol.stats()
    assert all(k in got for k in REQUIRED) and not any(k in got for k in ADJOINT)
    assert all(type(v) is float for v in got.values())
    want = _by_hand(sol)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=0), k
    fractions = [got[k] for k in ("converged_fraction", "max_iter_fraction", "diverged_fraction", "halted_fraction")]
    assert sum(fractions) == pytest.approx(1.0)
    # the rows f received (per-sample halting: at least the iterations summed over the batch)
    assert got["evaluations"] == float(sol.evaluations) >= float(sol.iterations.sum())


def test_residual_quantiles_are_over_finite_residuals_and_halted_is_counted():
    """A hand-made Solution: nan and inf residuals are left out of the quantiles; status code 3
    (HALTED) has its own fraction."""
    r = torch.tensor([1.0, math.nan, 3.0, math.inf, 2.0, 10.0], dtype=F64)
    status = torch.tensor([0, 2, 1, 2, HALTED, 0])
    sol = Solution(z=torch.zeros(6, 2), iterations=torch.tensor([3, 1, 9, 2, 5, 4]), residual=r,
                   converged=(status == 0) | (status == HALTED), status=status, evaluations=24)
    s = sol.stats()
    assert s["residual_median"] == 2.5 and s["residual_max"] == 10.0
    assert s["residual_p90"] == pytest.approx(np.quantile([1.0, 3.0, 2.0, 10.0], 0.9))
    assert (s["converged_fraction"], s["max_iter_fraction"], s["diverged_fraction"],
            s["halted_fraction"]) == (2 / 6, 1 / 6, 2 / 6, 1 / 6)
    assert (s["iterations_mean"], s["iterations_min"], s["iterations_max"]) == (4.0, 1.0, 9.0)


def test_no_finite_residual_gives_nan_quantiles_not_an_error():
    sol = Solution(z=torch.zeros(2, 1), iterations=torch.tensor([1, 1]),
                   residual=torch.tensor([math.nan, math.inf]), converged=torch.tensor([False, False]),
                   status=torch.tensor([2, 2]), evaluations=2)
    s = sol.stats()
    assert s["diverged_fraction"] == 1.0
    assert all(math.isnan(s[k]) for k in ("residual_median", "residual_p90", "residual_max"))


def test_empty_batch():
    """B = 0: the same keys; counts, means and fractions 0; residual quantiles nan; no error."""
    sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(0, 3), torch.zeros(0, 3))
    s = sol.stats()
    full = _mixed_batch().stats()
    assert set(s) == set(full)
    for k, v in s.items():
        assert type(v) is float
        if k.startswith("residual_"):
            assert math.isnan(v), k
        else:
            assert v == 0.0, k


def test_batch_halting_stats():
    sol = fpsolve.solve(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(5, 3, dtype=F64),
                        torch.randn(5, 3, dtype=F64, generator=generator(3)), halting="batch")
    s = sol.stats()
    assert s["iterations_min"] == s["iterations_max"] == float(sol.iterations[0])
    assert s["evaluations"] == 5 * s["iterations_max"] and s["converged_fraction"] == 1.0


def test_adjoint_figures_after_an_implicit_backward():
    W = random_contraction(1, 4, 0.8, seed=4)[0]
    x = torch.randn(5, 4, dtype=F64, generator=generator(5), requires_grad=True)
    sol = fpsolve.solve(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(5, 4, dtype=F64), x,
                        rtol=1e-10, max_iter=200)
    before = sol.stats()
    assert not any(k.startswith("adjoint_") for k in before)
    (sol.z ** 2).sum().backward()
    after = sol.stats()
    adj = sol.adjoint
    assert after["adjoint_iterations_mean"] == pytest.approx(float(adj.iterations.double().mean()))
    assert after["adjoint_iterations_max"] == float(adj.iterations.max()) > 1
    assert after["adjoint_converged_fraction"] == 1.0
    assert after["adjoint_evaluations"] == float(adj.evaluations)
    assert after["adjoint_residual_max"] == pytest.approx(float(adj.residual.max()))
    assert {k: v for k, v in after.items() if not k.startswith("adjoint_")} == before


# --------------------------------------------------------------------------------------------
# DEQ.last_solution
# --------------------------------------------------------------------------------------------

class Cell(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(width, width)
        self.inj = nn.Linear(width, width)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def test_deq_keeps_the_last_solution_detached_and_it_receives_the_adjoint():
    layer = fpsolve.DEQ(Cell())
    assert layer.last_solution is None
    x = torch.randn(4, 6, generator=generator(6))
    z, sol = layer(x)
    last = layer.last_solution
    assert last is not sol and not last.z.requires_grad and z.requires_grad
    assert torch.equal(last.z, z.detach()) and torch.equal(last.iterations, sol.iterations)
    assert "adjoint_iterations_mean" not in last.stats()
    z.square().sum().backward()
    row = layer.last_solution.stats()          # the one line for a logger
    assert row["adjoint_iterations_mean"] == sol.stats()["adjoint_iterations_mean"] > 0
    # safe to keep: the module still deep-copies (an EMA copy) and its state_dict is unchanged
    twin = copy.deepcopy(layer)
    assert set(twin.state_dict()) == set(layer.state_dict()) == {
        "block.lin.weight", "block.lin.bias", "block.inj.weight", "block.inj.bias"}
    # a new forward replaces it, also without grad
    with torch.no_grad():
        layer(2 * x)
    assert layer.last_solution is not last and layer.last_solution.adjoint is None


def test_logging_every_step_to_a_csv():
    """The docs/training.md recipe: one row per training step, adjoint figures included."""
    torch.manual_seed(0)
    layer = fpsolve.DEQ(Cell())
    head = nn.Linear(6, 1)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    out = io.StringIO()
    writer = None
    for step in range(3):
        z, _ = layer(x)
        loss = (head(z) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"step": step, **layer.last_solution.stats()}
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(row))
            writer.writeheader()
        writer.writerow(row)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 3 and float(rows[-1]["adjoint_converged_fraction"]) == 1.0
    assert all(float(r["iterations_mean"]) > 1 for r in rows)
