"""docs/torchdeq.md: the same small DEQ in torchdeq and in fpsolve reaches the same fixed point
and the same implicit gradients (float64 tight, float32 at its own resolution)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fpsolve

torchdeq = pytest.importorskip("torchdeq")
PAGE = Path(__file__).resolve().parents[1] / "docs" / "torchdeq.md"


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x) with ||W||_2 = 0.5: one attracting fixed point per sample."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            self.lin.weight *= 0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize(("dtype", "tol", "solver"), [
    (torch.float64, 1e-9, "anderson"),
    (torch.float64, 1e-9, "broyden"),
    (torch.float32, 1e-5, "anderson"),
])
def test_both_libraries_reach_the_same_fixed_point_and_gradients(one_thread, dtype, tol, solver):
    torch.manual_seed(0)
    cell = Cell(8, dtype)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    target = torch.randn(4, 8, dtype=dtype)
    params = [x, *cell.parameters()]

    deq = torchdeq.get_deq(f_solver=solver, f_max_iter=80, f_tol=tol, f_stop_mode="abs", ift=True,
                           b_solver=solver, b_max_iter=80, b_tol=tol, b_stop_mode="abs")
    z_out, _ = deq(lambda z: cell(z, x), torch.zeros(4, 8, dtype=dtype))
    theirs = torch.autograd.grad((z_out[-1] - target).square().sum(), params)

    layer = fpsolve.DEQ(cell, solver=solver, backward="implicit", atol=tol, rtol=0.0, max_iter=80)
    z, sol = layer(x)
    ours = torch.autograd.grad((z - target).square().sum(), params)

    assert sol.converged.all() and sol.adjoint.converged.all()
    # both stop at residual <= tol on a 0.5-contraction: each is within 2 tol of z*
    torch.testing.assert_close(z, z_out[-1], rtol=0, atol=10 * tol)
    # the implicit gradients agree to the adjoint tolerance
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float64 else 1e-3,
                                   atol=100 * tol)


def test_fixed_point_matches_a_direct_solve_of_the_linear_case(one_thread):
    """A linear cell: both libraries must hit (I - W)^-1 (b + x), the closed form."""
    torch.manual_seed(1)
    W = torch.randn(6, 6, dtype=torch.float64)
    W *= 0.6 / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(3, 6, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - W, x.T).T
    f = lambda z, x: z @ W.T + x  # noqa: E731
    deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=60, f_tol=1e-10, f_stop_mode="abs")
    z_out, _ = deq(lambda z: f(z, x), torch.zeros_like(x))
    sol = fpsolve.solve(f, torch.zeros_like(x), x, atol=1e-10, rtol=0.0, max_iter=60, backward="none")
    torch.testing.assert_close(sol.z, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(z_out[-1].detach(), exact, rtol=0, atol=1e-9)


def test_the_page_maps_every_get_deq_argument_the_issue_names():
    text = PAGE.read_text()
    for name in ["f_solver", "b_solver", "f_max_iter", "b_max_iter", "f_tol", "b_tol", "stop_mode",
                 "ift", "hook_ift", "grad=", "tau", "apply_norm", "reset_norm", "jac_reg",
                 "fp_correction", "no equivalent yet", "get_deq(", "fpsolve.DEQ(",
                 # issue 20, item 6: what a port meets
                 "eval_f_max_iter", "eval_max_iter=", "f_max_iter + 1", "normalize=True",
                 "jacobian_normalize=True", "def from_torchdeq_args(args)", "adapt_state_dict(model, checkpoint)",
                 "returns f(z*)", "last damped step"]:
        assert name in text, name
