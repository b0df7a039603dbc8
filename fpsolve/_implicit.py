"""The implicit gradient (`Implicit`): the adjoint fixed point u = u ∂f/∂z + g, solved per
sample with the forward's own loop, then one vector-Jacobian product through f(z*, x).

The forward runs without autograd (memory does not grow with its depth); only one
evaluation of f at z* is kept, and the adjoint's products are taken through it (or through a
graph rebuilt on the rows still active, see `RowProducts`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from ._checks import as_float, as_int, as_tolerances, check_transforms
from ._criteria import Residual
from ._rules import finite_dead_rows, live_rows
from ._run import Run
from ._solution import Solution, Status
from ._tree import select_rows
from .solvers import Solver, make_solver


class ConvergenceWarning(UserWarning):
    """A solve that a gradient depends on did not converge (e.g. the implicit adjoint).

    Issued (a `UserWarning` subclass, through `warnings.warn`) by `backward="implicit"` when
    forward samples are not at fixed points (budget spent, or `HALTED` away from one), so the
    implicit gradient assumes what does not hold, or when the adjoint solve itself does not
    converge. Turn it into an error with `warnings.simplefilter("error",
    fpsolve.ConvergenceWarning)`.

    Example:
        ```python
        import warnings
        x = torch.ones(2, 3, requires_grad=True)
        sol = fpsolve.solve(lambda z, x: 0.99 * z + x, torch.zeros(2, 3), x, solver="fixed_point", max_iter=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol.z.sum().backward()
        assert any(issubclass(w.category, fpsolve.ConvergenceWarning) for w in caught)
        ```
    """


@dataclass(frozen=True)
class Implicit:
    """Implicit function theorem: solve the adjoint u = u ∂f/∂z + g per sample, then one VJP.

    The gradient of the exact fixed point, whatever solver found it. Memory does not grow
    with the forward iterations (only one evaluation of f at z* is kept). Options left as None
    are taken from the forward solve. The adjoint's own result is put in `sol.adjoint` (a
    `Solution`) when backward runs; samples whose adjoint did not converge, or that were not
    at a fixed point, get a `ConvergenceWarning`. `backward="implicit"` is `Implicit()`.

    Args:
        solver: The adjoint's solver (a name or a solver object); None: the forward's.
        rtol: The adjoint's relative tolerance; None: the forward's.
        atol: The adjoint's absolute tolerance; None: the forward's.
        max_iter: The adjoint's budget (an integer >= 1); None: the forward's.

    Raises:
        TypeError: a non-numeric tolerance or `max_iter`, or a solver of the wrong type.
        ValueError: a negative tolerance, both zero, `max_iter` < 1, or an unknown solver name.
        RuntimeError: at backward, a double backward (`create_graph=True`): use `Unroll` or
            `Phantom` for higher-order gradients.

    Example:
        ```python
        A = torch.tensor([[0.5, 0.1], [0.0, 0.4]], dtype=torch.float64)
        x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        g = lambda x: fpsolve.solve(lambda z, x: z @ A.T + x, torch.zeros(3, 2, dtype=torch.float64), x,
                                    rtol=1e-12, backward=fpsolve.Implicit(rtol=1e-12)).z
        assert torch.autograd.gradcheck(g, (x,))   # z* = (I - A)^-1 x, checked numerically
        ```
    """

    solver: Union[str, Solver, None] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    max_iter: Optional[int] = None

    def __post_init__(self) -> None:
        # Validated when made (not at the first backward); numbers are stored as plain ones.
        if self.max_iter is not None:
            object.__setattr__(self, "max_iter", as_int("Implicit(max_iter=...)", self.max_iter))
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, as_float(f"Implicit({name}=...)", v))
        if self.atol is not None and self.rtol is not None:
            as_tolerances(self.atol, self.rtol, ("Implicit(atol=...)", "Implicit(rtol=...)"))
        if self.solver is not None:
            make_solver(self.solver)

    records_forward = False         # (the forward runs without autograd: memory flat in depth)
    autograd_in_backward = True     # (its backward runs torch.autograd on a kept graph)

    def apply(self, run: Run) -> Solution:
        """Run the forward without autograd, then attach the implicit gradient to `sol.z`.

        Args:
            run: The solve as the loop sees it (`fpsolve._run.Run`), made by `solve`.

        Returns:
            The forward's `Solution`, its `z` (loop layout) carrying the implicit gradient.
        """
        with torch.no_grad():
            sol = run.forward()
        solver = run.solver if self.solver is None else make_solver(self.solver)
        rule = Residual(run.rule.atol if self.atol is None else self.atol,
                        run.rule.rtol if self.rtol is None else self.rtol, run.rule.norm)
        adjoint = replace(run, solver=solver, rule=rule, max_iter=run.max_iter if self.max_iter is None else self.max_iter,
                          criterion=None, record=False, round_fn=None, path_passes=())
        check_transforms("implicit")
        # A DIVERGED row must give exactly zero gradient (not 0 * nan): under halting="sample"
        # the graph of f is built on the live rows alone; under "batch" (f may mix rows) on
        # the whole batch, with the dead rows' non-finite inputs zeroed.
        x, rows = run.x, live_rows(sol.status)
        z_star = sol.z.detach()
        if rows is not None and run.per_sample:
            if rows.numel() == 0:
                sol.z = z_star
                return sol
            x, z_star = select_rows(x, rows), z_star.index_select(0, rows)
        elif rows is not None:
            x, rows = finite_dead_rows(x, sol.status), None
        zs = z_star.requires_grad_()
        with torch.enable_grad():
            out = run.fn(zs, x)
        products = _AdjointRunner(run.fn, x, out, zs, replace(adjoint, x=x), sol, run.rule, rows)
        sol.z = _ImplicitFunction.apply(out, sol.z.detach(), products)
        return sol


def _vjp(out: Tensor, z: Tensor, v: Tensor) -> Tensor:
    """v ∂out/∂z through a kept graph (zero when out does not depend on z)."""
    w = torch.autograd.grad(out, z, v, retain_graph=True, allow_unused=True)[0]
    return torch.zeros_like(v) if w is None else w


#: f on a subset of rows must give the rows of f on the batch to this many units of rounding
#: (relative to the largest entry), or the adjoint keeps the whole-batch graph.
ROWS_TOLERANCE = 64


class _AdjointRunner:
    """Holds f(z*, x) with its graph and solves the adjoint when backward asks.

    `runner(v)` is v ∂f/∂z at z* over the whole batch. `on_rows(rows)` is the same product
    for the rows `rows` alone, through a graph of f built once on z*[rows], x[rows] (so rows
    that halted cost nothing). It is None (the caller then keeps the whole batch) when f
    fails on those rows, returns another shape (f closed over per-batch tensors), or returns
    other values than on the whole batch (f changes per call: nn.Dropout in train mode, a
    spectral_norm hook's power iteration, train-mode BatchNorm).
    """

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], x: Any, out: Tensor, zs: Tensor, adjoint: Run,
                 solution: Solution, forward_rule: Residual, rows: Optional[Tensor] = None) -> None:
        self.fn, self.x, self.out, self.zs = fn, x, out, zs
        self.rows = rows   # the forward rows in the graph (None: all)
        self.forward_rule = forward_rule   # the forward's residual rule: is z* a fixed point?
        self.adjoint = adjoint       # the adjoint's Run template: solver, rule, budget, halting
        self.solution = solution     # the forward Solution, to receive `adjoint`
        self.rows_fail = False       # f failed on a subset once: never try again

    def solve(self, grad: Tensor) -> "tuple[Tensor, Solution]":
        """Solve u = u ∂f/∂z + grad per sample with the forward loop; u starts at grad.
        Products are taken on the active rows only once rows halt (see `RowProducts`)."""
        products = RowProducts(self, grad.shape[0])

        def h(u: Tensor, xa: "tuple[Tensor, Tensor]") -> Tensor:
            g_rows, rows = xa
            return products(u, rows) + g_rows

        grad = grad.detach()
        with torch.no_grad():
            xa = (grad, torch.arange(grad.shape[0], device=grad.device))
            adjoint = self.adjoint.forward(fn=h, z0=grad, x=xa, fz0=h(grad, xa))
        return adjoint.z, adjoint

    def warn_if_not_fixed_points(self) -> None:
        """The implicit gradient assumes z* = f(z*): warn for samples that are not there (budget
        spent, or HALTED by a read-out criterion where the residual rule does not hold)."""
        sol, rule = self.solution, self.forward_rule
        with torch.no_grad():
            held = rule.holds(self.zs.detach(), self.out.detach())
            status = sol.status if self.rows is None else sol.status.index_select(0, self.rows)
            off = ~held & (status != int(Status.DIVERGED))   # (DIVERGED rows are reported as such)
        n = int(off.sum())
        if n:
            warnings.warn(
                f"backward='implicit' differentiates through a fixed point, but {n} of {off.numel()} "
                f"samples are not at one (status {status[off].tolist()[:8]}: budget spent or halted "
                f"by a read-out criterion); their gradients are approximate. Raise max_iter, or use "
                f"backward='unroll' / fpsolve.Phantom(...) to differentiate the passes actually run.",
                ConvergenceWarning,
                stacklevel=3,
            )

    def __call__(self, v: Tensor) -> Tensor:
        return _vjp(self.out, self.zs, v)

    vjp = __call__

    def on_rows(self, rows: Tensor) -> Optional[Callable[[Tensor], Tensor]]:
        if self.rows_fail:
            return None
        z = self.zs.detach().index_select(0, rows).requires_grad_()
        try:
            with torch.enable_grad():
                out = self.fn(z, select_rows(self.x, rows))
            ok = isinstance(out, Tensor) and out.shape == z.shape and out.dtype == z.dtype
            if ok:   # the same map? (not if f changes per call: nn.Dropout, a spectral_norm hook)
                ref = self.out.detach().index_select(0, rows)
                tol = ROWS_TOLERANCE * torch.finfo(ref.dtype).eps * (1 + ref.abs().max())
                ok = bool((out.detach() - ref).abs().max() <= tol)
        except Exception:   # noqa: BLE001 - the whole-batch product is the documented fallback
            ok = False
        if not ok:
            self.rows_fail = True
            return None
        return lambda v: _vjp(out, z, v)


#: Rebuild the adjoint's graph of f on the active rows once they are at most this fraction of
#: the rows of the graph in use (a rebuild costs one evaluation of f on the active rows).
REBUILD_FRACTION = 0.75


class RowProducts:
    """u -> u ∂f/∂z for the adjoint's active rows, through the smallest graph of f that works.

    Once per-sample halting has dropped rows, the graph is rebuilt on the active rows
    (`vjp.on_rows`), so halted rows cost nothing. If f fails on a subset of rows (e.g. it
    closes over per-batch tensors), the whole-batch graph is kept: the active rows are
    scattered into it and gathered back (same values, more work).
    """

    def __init__(self, vjp: Callable[[Tensor], Tensor], batch: int) -> None:
        self.on_rows = getattr(vjp, "on_rows", None)
        self.batch = batch
        self.vjp, self.size, self.lookup = vjp, batch, None   # graph in use; lookup: row -> position
        self.rows: Any = None                                  # the rows seen last, and where they sit
        self.pos: Any = None

    def __call__(self, u: Tensor, rows: Tensor) -> Tensor:
        b = u.shape[0]
        if rows is not self.rows:     # the loop hands a new index tensor when rows drop
            self.rows = rows
            if b < self.size and self.on_rows is not None and b <= REBUILD_FRACTION * self.size:
                sub = self.on_rows(rows)
                if sub is not None:
                    self.vjp, self.size = sub, b
                    self.lookup = torch.full((self.batch,), -1, dtype=torch.int64, device=rows.device)
                    self.lookup[rows] = torch.arange(b, device=rows.device)
            if b == self.size:
                self.pos = None
            else:
                self.pos = rows if self.lookup is None else self.lookup.index_select(0, rows)
        if self.pos is None:
            return self.vjp(u)
        v = u.new_zeros((self.size,) + tuple(u.shape[1:])).index_copy_(0, self.pos, u)
        return self.vjp(v).index_select(0, self.pos)


class _ImplicitFunction(torch.autograd.Function):
    """Forward: the value z*. Backward: g -> u with u = u ∂f/∂z + g, passed on to f(z*, x)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, z_star: Tensor, runner: _AdjointRunner) -> Tensor:  # type: ignore[override]
        ctx.runner = runner
        return z_star.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) through backward='implicit' is not "
                "supported; use backward=fpsolve.Unroll() or fpsolve.Phantom(...) for "
                "higher-order gradients."
            )
        runner: _AdjointRunner = ctx.runner
        runner.warn_if_not_fixed_points()
        if runner.rows is not None:   # (a diverged row's gradient is zero: it is not in the graph)
            grad = grad.index_select(0, runner.rows)
        u, adjoint = runner.solve(grad)
        runner.solution.adjoint = adjoint
        bad = ~adjoint.converged
        if bool(bad.any()):
            warnings.warn(
                f"the implicit adjoint solve did not converge for {int(bad.sum())} of "
                f"{bad.numel()} samples (status {adjoint.status[bad].tolist()[:8]}); their "
                f"gradients are approximate. Raise Implicit(max_iter=...), use a stronger "
                f"solver, or see sol.adjoint.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return u, None, None



__all__ = ["ConvergenceWarning", "Implicit", "RowProducts"]
