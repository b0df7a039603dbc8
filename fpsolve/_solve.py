"""`fpsolve.solve`: options, layout, first call, gradient strategy, result.

The options are normalised once (`_options.Options`), the state is packed into the loop's
layout (`_tree.StateLayout`), f is called once at z0 (its output checked in full), and the
gradient strategy (`Implicit`, `Phantom`, `Unroll`) runs the loop (`_run.Run`) and attaches
its gradient; without a gradient the loop runs as it is. `DEQ` calls `solve_with`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from ._checks import check_transforms, usable_start
from ._correction import attach as attach_corrections
from ._criteria import PackedCriterion
from ._options import SOLVE_DEFAULTS, Options
from ._rules import check_untouched, rounding, version
from ._run import Run
from ._solution import Solution
from ._tree import StateLayout, check_x, tensors_in
from .solvers import Solver


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
    min_iter: Optional[int] = None,
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
            rows leave f's batch at a look; counts and results stay exact); None: looks
            placed by prediction, so that f is called at most once after the last sample stops.
        min_iter: None, or the fewest evaluations of f before any sample may stop by its
            criterion (CONVERGED or HALTED; a DIVERGED sample still stops at once).
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
    opts = Options.make("solve", SOLVE_DEFAULTS, dict(
        solver=solver, atol=atol, rtol=rtol, max_iter=max_iter, halting=halting, backward=backward, norm=norm,
        record=record, criterion=criterion, check_every=check_every, min_iter=min_iter, correction=correction))
    return solve_with(f, z0, x, opts)


def solve_with(f: Callable[..., Any], z0: Any, x: Any, opts: Options) -> Solution:
    """`solve` with normalised options (what `DEQ` and `diagnose` call)."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x) (or f(z) when x is None); got {type(f).__name__}.")
    check_transforms(opts.backward)
    z0 = usable_start(z0)
    layout = StateLayout(z0)
    check_x(x, layout.batch)
    for t in tensors_in(x):
        if t.device != layout.device:
            raise ValueError(f"x holds a tensor on {t.device} but z0 is on {layout.device}: move them to one device.")

    # ---- the first call, at z0 (detached: the fixed point does not depend on it) ----------
    z_start = layout.pack(z0)
    if z_start.requires_grad:
        z_start = z_start.detach()
    grad_mode = torch.is_grad_enabled() and opts.backward is not None
    z0_start = layout.unpack(z_start) if layout.container is not None else z0.detach()
    inputs = tensors_in(z0_start)
    before = [version(t) for t in inputs]
    try:
        with torch.set_grad_enabled(grad_mode):
            first = f(z0_start, x) if x is not None else f(z0_start)
        check_untouched(before, inputs)
        layout.check_output(first)
    except Exception as err:
        try:   # mark it as raised by the first call (DEQ explains it); never mask the error
            err._fpsolve_at_start = True   # type: ignore[attr-defined]
        except Exception:
            pass
        raise
    fz0 = layout.pack(first)
    del first
    if layout.batch == 0:   # (f's output was checked once; there is nothing to solve)
        return _empty(layout, z_start, opts)
    # A graph is needed only if x or a tensor f uses requires grad (f's output tells).
    needs_grad = grad_mode and fz0.requires_grad
    if not (needs_grad and opts.backward.records_forward):
        fz0 = fz0.detach()   # (the first call's graph is not needed: free it before the loop)

    # ---- the loop, run by the gradient strategy ------------------------------------------
    fn = layout.wrap(f, x is not None)
    criterion = None if opts.criterion is None else PackedCriterion(opts.criterion, layout.unpack)
    run = Run(fn, z_start, x, fz0, opts.solver, opts.rule, opts.max_iter, opts.per_sample, criterion,
              opts.record, opts.check_every, rounding(layout.dtype, layout.work_dtype), opts.path_passes,
              opts.min_iter)
    del fz0
    if needs_grad:
        sol = opts.backward.apply(run)
    else:
        with torch.no_grad():
            sol = run.forward()
    if sol.path is not None:   # fixed-point correction: phantom gradients on the kept iterates
        path = attach_corrections(fn, sol.path, sol.status, x, opts.correction, opts.per_sample) if needs_grad \
            else [p.detach() for p in sol.path]
        sol.path = [layout.unpack(p) for p in path]
    sol.z = layout.unpack(sol.z)
    return sol


def _empty(layout: StateLayout, z_start: torch.Tensor, opts: Options) -> Solution:
    """The Solution of an empty batch: z0's shape and structure, no evaluations."""
    empty = torch.zeros(0, dtype=torch.int64, device=layout.device)
    return Solution(z=layout.unpack(z_start), iterations=empty, residual=empty.to(z_start.dtype),
                    converged=empty.bool(), status=empty.clone(), evaluations=0,
                    trace=None if not opts.record else torch.zeros(0, 0, dtype=z_start.dtype),
                    path=[layout.unpack(z_start) for _ in opts.path_passes] if opts.path_passes else None)


__all__ = ["solve", "solve_with"]
