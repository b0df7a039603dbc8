"""`fpsolve.solve`: validate every argument, build the solver, run the loop, return a Solution."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Union

import torch

from ._loop import iterate
from ._solution import Solution, Status
from ._tree import StateLayout, check_x, tensors_in
from .solvers import Anderson, Broyden, FixedPointIteration, Solver

SOLVERS: Dict[str, Callable[[], Solver]] = {
    "fixed_point": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
}
BACKWARDS = ("implicit", "phantom", "unroll", "none")
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


def _check_backward(backward: Any) -> Any:
    if isinstance(backward, str):
        _check_choice("backward", backward, BACKWARDS)
    return backward


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
    backward = _check_backward(backward)
    for i, t in enumerate(tensors_in(x)):
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
    fn = layout.wrap(f, x is not None)
    grad_wanted = torch.is_grad_enabled() and backward != "none"
    with torch.set_grad_enabled(grad_wanted):
        first = f(z0, x) if x is not None else f(z0)
    layout.check_output(first)
    if grad_wanted and any(t.requires_grad for t in tensors_in(first)):
        raise NotImplementedError(
            f"backward={backward!r}: gradients through the solve are not implemented yet; pass "
            f"backward='none' (sol.z is then detached) or call solve under torch.no_grad()."
        )
    with torch.no_grad():
        fz0 = layout.pack(first)
        if fz0.requires_grad:
            fz0 = fz0.detach()
        res = iterate(
            fn, z_start, x, fz0, solver_obj,
            atol=atol, rtol=rtol, max_iter=max_iter,
            per_sample=halting == "sample", norm=norm, record=record,
        )
    return Solution(
        z=layout.unpack(res.z),
        iterations=res.iterations,
        residual=res.residual,
        converged=res.converged,
        status=res.status,
        evaluations=res.evaluations,
        trace=res.trace,
    )


__all__ = ["solve", "make_solver", "Status"]
