"""`fpsolve.solve`: validate every argument, build the solver, run the loop, return a Solution."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ._backward import (Implicit, Phantom, Unroll, check_transforms, checkpointed, implicit_attach,
                        make_backward, phantom_steps)
from ._checks import as_bool, as_int, as_tolerances, usable_start
from ._correction import attach as attach_corrections, check_correction
from ._criteria import Residual, make_criterion
from ._loop import Halt, iterate
from ._solution import Solution, Status
from ._tree import StateLayout, check_x, select_rows, tensors_in
from .solvers import Anderson, Broyden, FixedPointIteration, Solver

SOLVERS: Dict[str, Callable[[], Solver]] = {
    "fixed_point": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
}
HALTINGS = ("sample", "batch")
#: passes between two host looks, in solve (halting="sample") and stream: measured, see
#: docs/streaming.md (the check_every sweep)
DEFAULT_CHECK_EVERY = 4
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


def check_max_iter(value: Any, name: str = "max_iter") -> int:
    """An integer >= 1 (numpy integers accepted; bools and floats are not)."""
    try:
        return as_int(name, value)
    except TypeError as err:   # (solve has always answered a wrong max_iter with ValueError)
        raise ValueError(str(err)) from None


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
    criterion: Any = None,
    check_every: Optional[int] = None,
    correction: Any = None,
) -> Solution:
    """Find z with z = f(z, x) (or f(z) when x is None) for every sample of a batch.

    A sample halts when ||f(z) - z|| <= atol + rtol * ||f(z)|| (per-sample norm over all its
    non-batch dimensions); with halting="sample" it is then no longer passed to f. Returns a
    `Solution`: per sample the best iterate, its residual, the evaluations it received and a
    `Status`. Non-finite or blown-up samples get DIVERGED without disturbing the rest.
    float16/bfloat16 states are iterated in float32 but every iterate is rounded to the
    state's dtype before f sees it, so statuses hold at the returned values (the residual
    computed in float32 from them).

    Args:
        f: The map: `f(z, x) -> ` a state with the structure, shape, dtype and device of z
            (`f(z)` when x is None). Under halting="sample" it must treat samples
            independently.
        z0: The starting point: a floating tensor `[B, ...]`, or a tuple/list of such sharing
            B, dtype and device. It is detached: the fixed point does not depend on it.
        x: None, a tensor `[B, ...]`, or a tuple/list/dict of batch-first tensors (same B as
            z0, same device).
        solver: "fixed_point", "anderson", "broyden", or a solver object such as
            `fpsolve.Anderson(m=5)` (any object with `init` and `step`).
        atol: Absolute tolerance (>= 0).
        rtol: Relative tolerance (>= 0; atol and rtol may not both be 0).
        max_iter: The most evaluations of f that any one sample receives (>= 1).
        halting: "sample": each sample stops at its own fixed point; "batch": every sample
            is iterated until all halt (for an f that mixes samples, e.g. BatchNorm).
        backward: How `sol.z` gets its gradient: "implicit", "phantom", "unroll", "none", or
            an `Implicit`, `Phantom` or `Unroll` object.
        norm: The per-sample norm of the criterion: "l2" or "inf" (largest entry).
        record: Keep the residual history in `sol.trace`.
        criterion: None (the residual rule from atol, rtol, norm) or a criterion object
            (`Residual`, `Stable`, `OutputKL`, `HaltHead`); samples another criterion stops
            are `HALTED`.
        check_every: With halting="sample", passes between two looks of the host (stopped
            rows leave f's batch at a look; counts and results stay exact); None: fpsolve's
            default (4).
        correction: None or a `fpsolve.Correction(passes=..., steps=k, damping=λ)`:
            `sol.path` then holds the iterates at those passes, each with the gradient of k
            damped steps from it (fixed-point correction).

    Returns:
        A `Solution` (`z` with z0's structure; `iterations`, `residual`, `converged`,
        `status` per sample; `evaluations`; `trace` with record=True).

    Raises:
        TypeError: f not callable; z0, x, or f's output not tensors of the accepted kinds;
            a non-floating z0; a solver, backward or criterion of the wrong type (or a class
            instead of an instance).
        ValueError: f returning another shape, dtype or device than z0; x with another batch
            size or device; max_iter or check_every < 1; negative tolerances or both zero; an
            unknown solver, backward, halting or norm name.

    Example:
        ```python
        A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
        x = torch.randn(8, 2, dtype=torch.float64)
        sol = fpsolve.solve(lambda z, x: z @ A.T + x, torch.zeros_like(x), x, rtol=1e-10)
        exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, x.T).T   # z* = (I - A)^-1 x
        assert torch.allclose(sol.z, exact) and bool(sol.converged.all())
        ```
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x) (or f(z) when x is None); got {type(f).__name__}.")
    check_transforms(backward)
    z0 = usable_start(z0)
    layout = StateLayout(z0)
    check_x(x, layout.batch)
    atol, rtol = as_tolerances(atol, rtol)
    max_iter = check_max_iter(max_iter)
    solver_obj = make_solver(solver)
    _check_choice("halting", halting, HALTINGS)
    _check_choice("norm", norm, NORMS)
    record = as_bool("record", record)
    rule, other = make_criterion(criterion, atol, rtol, norm)
    check_every = DEFAULT_CHECK_EVERY if check_every is None else check_max_iter(check_every, "check_every")
    bw = make_backward(backward)
    keep = check_correction(correction, max_iter)
    for t in tensors_in(x):
        if t.device != layout.device:
            raise ValueError(f"x holds a tensor on {t.device} but z0 is on {layout.device}: move them to one device.")

    z_start = layout.pack(z0)
    if z_start.requires_grad:
        z_start = z_start.detach()
    B = layout.batch
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
    if B == 0:   # (f's output was checked once; there is nothing to solve)
        empty = torch.zeros(0, dtype=torch.int64, device=layout.device)
        return Solution(z=layout.unpack(z_start), iterations=empty, residual=empty.to(z_start.dtype),
                        converged=empty.bool(), status=empty.clone(), evaluations=0,
                        trace=None if not record else torch.zeros(0, 0, dtype=z_start.dtype),
                        path=[layout.unpack(z_start) for _ in keep] if keep else None)
    # A graph is needed only if x or a tensor f uses requires grad (f's output tells).
    needs_grad = grad_mode and fz0.requires_grad
    round_fn = None
    if layout.work_dtype != layout.dtype:
        low = layout.dtype
        round_fn = lambda t: t.to(low).to(t.dtype)  # noqa: E731
    options = dict(rule=rule, max_iter=max_iter, per_sample=halting == "sample", record=record,
                   check_every=check_every,
                   round_fn=round_fn, halt=None if other is None else Halt(other, layout.unpack))
    runner = None
    if needs_grad and isinstance(bw, Unroll) and bw.steps is None:
        # Record the whole forward solve, solver algebra included (a look at every pass: the
        # graph must hold no pass after a sample stopped, whose algebra may be non-finite).
        res = iterate(fn, z_start, x, fz0, solver_obj, **dict(options, check_every=1), keep=keep)
        z_out = res.z
    else:
        fz0 = fz0.detach() if fz0.requires_grad else fz0
        del first   # (the graph of the first call is not needed: free it before the loop)
        with torch.no_grad():
            res = iterate(fn, z_start, x, fz0, solver_obj, **options, keep=keep)
        z_out = res.z
        if needs_grad:
            if isinstance(bw, Implicit):
                adjoint_solver = solver_obj if bw.solver is None else make_solver(bw.solver)
                adjoint_options = dict(
                    options, record=False, halt=None, round_fn=None,
                    rule=Residual(rule.atol if bw.atol is None else float(bw.atol),
                                  rule.rtol if bw.rtol is None else float(bw.rtol), rule.norm),
                    max_iter=max_iter if bw.max_iter is None else bw.max_iter,
                )
                z_out, runner = implicit_attach(
                    fn, res.z, x, lambda vjp, g: _solve_adjoint(vjp, g, adjoint_solver, adjoint_options))
            else:
                steps, damping = (bw.steps, bw.damping) if isinstance(bw, Phantom) else (bw.steps, 1.0)
                z_out = _stepped(fn, res, x, steps, damping, halting == "sample")
    sol = res
    sol.z = layout.unpack(z_out)
    if keep:   # fixed-point correction: phantom gradients on the kept iterates
        path = attach_corrections(fn, res.path, res, x, correction, halting == "sample") if needs_grad \
            else [p.detach() for p in res.path]
        sol.path = [layout.unpack(p) for p in path]
    if runner is not None:
        runner.solution, runner.rule = sol, rule
    return sol


def _stepped(fn: Callable[[Tensor, Any], Tensor], res: Solution, x: Any, steps: int, damping: float,
             per_sample: bool) -> Tensor:
    """res.z carrying the gradient of `steps` damped passes of f (Phantom, Unroll(steps=k)).

    DIVERGED rows keep their finite value without a gradient: with per-sample halting they are
    left out of the passes (their non-finite f would poison shared parameters' gradients);
    under halting="batch" (f may mix rows) their part of the graph is masked out.
    """
    ok = res.status != int(Status.DIVERGED)
    if bool(ok.all()):
        return res.z + _finite_delta(phantom_steps(fn, res.z, x, steps, damping))
    if per_sample:
        rows = ok.nonzero().squeeze(1)
        if rows.numel() == 0:
            return res.z
        graph = phantom_steps(fn, res.z.index_select(0, rows), select_rows(x, rows), steps, damping)
        return res.z + torch.zeros_like(res.z).index_copy(0, rows, _finite_delta(graph))
    # halting="batch": f may mix rows, so a diverged row stays frozen at its value through the
    # passes (else its non-finite f would reach every row at the next pass).
    mask = ok.view((-1,) + (1,) * (res.z.ndim - 1))
    frozen = res.z.detach()

    class _Frozen:
        segment = getattr(fn, "segment", None)   # (Unroll(checkpoint=c) segments, see _backward)

        def __call__(self, z: Tensor, xa: Any) -> Tensor:
            return torch.where(mask, fn(z, xa), frozen)

    graph = phantom_steps(_Frozen(), res.z, x, steps, damping)
    return res.z + torch.where(mask, _finite_delta(graph), torch.zeros_like(graph))


def _finite_delta(graph: Tensor) -> Tensor:
    """graph - graph.detach() (zero valued, carrying graph's gradient), and zero without a
    gradient on a row where the passes turned non-finite (so sol.z never does)."""
    finite = torch.isfinite(graph.detach()).flatten(1).all(dim=1).view((-1,) + (1,) * (graph.ndim - 1))
    return torch.where(finite, graph - graph.detach(), torch.zeros_like(graph))


def _solve_adjoint(vjp: Callable[[Tensor], Tensor], grad: Tensor, solver: Solver,
                   options: Dict[str, Any]) -> Tuple[Tensor, Solution]:
    """Solve u = u ∂f/∂z + grad per sample with the forward loop; u starts at grad.

    Products are taken on the active rows only once rows halt (see `RowProducts`).
    """
    from ._backward import RowProducts   # (beside the runner whose products it takes)
    products = RowProducts(vjp, grad.shape[0])

    def h(u: Tensor, xa: Tuple[Tensor, Tensor]) -> Tensor:
        g_rows, rows = xa
        return products(u, rows) + g_rows

    grad = grad.detach()
    with torch.no_grad():
        xa = (grad, torch.arange(grad.shape[0], device=grad.device))
        adjoint = iterate(h, grad, xa, h(grad, xa), solver, **options)
    return adjoint.z, adjoint


__all__ = ["solve", "make_solver", "Status"]
