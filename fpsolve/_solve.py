"""`fpsolve.solve`: validate every argument, build the solver, run the loop, return a Solution."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple, Union

import torch
from torch import Tensor

from ._backward import (Implicit, Phantom, Unroll, checkpointed, implicit_attach, make_backward,
                        phantom_steps, with_value)
from ._loop import iterate
from ._solution import Solution, Status
from ._tree import StateLayout, check_x, tensors_in
from .solvers import Anderson, Broyden, FixedPointIteration, Solver

SOLVERS: Dict[str, Callable[[], Solver]] = {
    "fixed_point": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
}
HALTINGS = ("sample", "batch")
NORMS = ("l2", "inf")


def make_solver(solver: Union[str, Solver]) -> Solver:
    """A solver object from a name or an object that has `init` and `step`."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"solver={solver!r} is not known; use one of {sorted(SOLVERS)} or a solver "
                f"object such as fpsolve.Anderson(m=5)."
            )
        return SOLVERS[solver]()
    if isinstance(solver, type):
        raise TypeError(
            f"solver={solver.__name__} is a class; pass an instance, e.g. {solver.__name__}()."
        )
    if not (callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None))):
        raise TypeError(
            f"solver must be one of {sorted(SOLVERS)} or an object with init() and step() "
            f"(see fpsolve.solvers.Solver); got {solver!r}."
        )
    return solver


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of {list(choices)}.")


def _check_tolerance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    return float(value)


def solve(
    f: Callable[..., Any],
    z0: Any,
    x: Any = None,
    *,
    solver: Union[str, Solver] = "anderson",
    atol: float = 0.0,
    rtol: float = 1e-4,
    max_iter: int = 50,
    halting: str = "sample",
    backward: Any = "implicit",
    norm: str = "l2",
    record: bool = False,
) -> Solution:
    """Find z with z = f(z, x) (or f(z) when x is None) for every sample of a batch.

    A sample halts when ||f(z) - z|| <= atol + rtol * ||f(z)|| (per-sample norm over all its
    non-batch dimensions); with halting="sample" it is then no longer passed to f. Returns a
    `Solution`: per sample the best iterate, its residual, the evaluations it received and a
    `Status`. Non-finite or blown-up samples get DIVERGED without disturbing the rest.
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x) (or f(z) when x is None); got {type(f).__name__}.")
    layout = StateLayout(z0)
    check_x(x, layout.batch)
    atol = _check_tolerance("atol", atol)
    rtol = _check_tolerance("rtol", rtol)
    if atol == 0.0 and rtol == 0.0:
        raise ValueError("atol and rtol are both 0: no sample could ever halt; set rtol (e.g. 1e-4) or atol.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1; got {max_iter!r}.")
    solver_obj = make_solver(solver)
    _check_choice("halting", halting, HALTINGS)
    _check_choice("norm", norm, NORMS)
    bw = make_backward(backward)
    for t in tensors_in(x):
        if t.device != layout.device:
            raise ValueError(f"x holds a tensor on {t.device} but z0 is on {layout.device}: move them to one device.")

    z_start = layout.pack(z0)
    if z_start.requires_grad:
        z_start = z_start.detach()
    B = layout.batch
    if B == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=layout.device)
        return Solution(z=z0, iterations=empty, residual=empty.to(z_start.dtype),
                        converged=empty.bool(), status=empty.clone(), evaluations=0,
                        trace=None if not record else torch.zeros(0, 0, dtype=z_start.dtype))
    fn = checkpointed(layout.wrap(f, x is not None), bw)   # Unroll(checkpoint=c): see _backward
    grad_mode = torch.is_grad_enabled() and bw is not None
    # z0 is only a starting point: the fixed point does not depend on it, so it is detached.
    z0_start = layout.unpack(z_start) if layout.container is not None else z0.detach()
    try:
        with torch.set_grad_enabled(grad_mode):
            first = f(z0_start, x) if x is not None else f(z0_start)
        layout.check_output(first)
    except Exception as err:
        try:   # mark it as raised by the first call (DEQ explains it); never mask the error
            err._fpsolve_at_start = True   # type: ignore[attr-defined]
        except Exception:
            pass
        raise
    fz0 = layout.pack(first)
    # A graph is needed only if x or a tensor f uses requires grad (f's output tells).
    needs_grad = grad_mode and fz0.requires_grad
    options = dict(atol=atol, rtol=rtol, max_iter=max_iter, per_sample=halting == "sample",
                   norm=norm, record=record)
    runner = None
    if needs_grad and isinstance(bw, Unroll) and bw.steps is None:
        # Record the whole forward solve, solver algebra included.
        res = iterate(fn, z_start, x, fz0, solver_obj, **options)
        z_out = res.z
    else:
        fz0 = fz0.detach() if fz0.requires_grad else fz0
        del first   # (the graph of the first call is not needed: free it before the loop)
        with torch.no_grad():
            res = iterate(fn, z_start, x, fz0, solver_obj, **options)
        z_out = res.z
        if needs_grad:
            if isinstance(bw, Implicit):
                adjoint_solver = solver_obj if bw.solver is None else make_solver(bw.solver)
                adjoint_options = dict(
                    options, record=False,
                    atol=atol if bw.atol is None else float(bw.atol),
                    rtol=rtol if bw.rtol is None else float(bw.rtol),
                    max_iter=max_iter if bw.max_iter is None else bw.max_iter,
                )
                z_out, runner = implicit_attach(
                    fn, res.z, x, lambda vjp, g: _solve_adjoint(vjp, g, adjoint_solver, adjoint_options))
            else:
                steps, damping = (bw.steps, bw.damping) if isinstance(bw, Phantom) else (bw.steps, 1.0)
                z_out = with_value(res.z, phantom_steps(fn, res.z, x, steps, damping))
    sol = res
    sol.z = layout.unpack(z_out)
    if runner is not None:
        runner.solution = sol
    return sol


def _solve_adjoint(vjp: Callable[[Tensor], Tensor], grad: Tensor, solver: Solver,
                   options: Dict[str, Any]) -> Tuple[Tensor, Solution]:
    """Solve u = vjp(u) + grad per sample with the forward loop; u starts at grad."""
    B = grad.shape[0]

    def h(u: Tensor, xa: Tuple[Tensor, Tensor]) -> Tensor:
        g_rows, rows = xa
        if u.shape[0] == B:
            return vjp(u) + g_rows
        # Per-sample halting shrank the batch: the graph of f(z*, x) is over all rows.
        v = u.new_zeros((B,) + tuple(u.shape[1:])).index_copy_(0, rows, u)
        return vjp(v).index_select(0, rows) + g_rows

    grad = grad.detach()
    with torch.no_grad():
        xa = (grad, torch.arange(B, device=grad.device))
        adjoint = iterate(h, grad, xa, h(grad, xa), solver, **options)
    return adjoint.z, adjoint


__all__ = ["solve", "make_solver", "Status"]
