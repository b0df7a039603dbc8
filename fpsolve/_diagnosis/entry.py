"""`fpsolve.diagnose`: tell per sample why a fixed-point solve (or a looped model) misbehaves.

One call runs the solve the user would run, then asks the questions each failure needs:

- plain iteration of f from z0 (the looped model as it runs; `plain`): does it settle, cycle
  (and with which period), circle without a period, or grow without bound?
- the spectrum of ∂f/∂z at the returned point, by batched Arnoldi on Jacobian-vector
  products (`linear`, `spectral`): is the point attracting (spectral radius < 1)?
- a Newton step (I − ∂f/∂z)⁻¹ (f(z) − z) in the same Krylov space: how far is the point from
  the true fixed point, compared with the tolerance it passed?
- the linear response of the fixed point to a small change of x: does it depend on x at all?
- restarts from the origin and from points spread around the solution (`restarts`): same
  fixed point?
- the user's own `check(z, x)`: is the fixed point the right one?

The flags are then decided from these numbers alone (`verdict.decide`). Every step is batched
over samples; a sample's flags depend on that sample alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from .._checks import as_int
from .._options import SOLVE_DEFAULTS, Options
from .._solution import Solution
from .._solve import solve_with
from .._tree import StateLayout
from .common import Account, Point, Problem, flat_fn
from .keep import KeepState
from .linear import analyse
from .plain import Plain, PlainSetup, plain_run
from .report import Report
from .restarts import Search, search
from .verdict import Measurements, decide

JACOBIANS = ("auto", "forward", "differences")


@dataclass(frozen=True)
class Settings:
    """diagnose's own arguments, checked (`plain_iter` resolved to a number)."""

    restarts: int
    check: Optional[Callable[[Any, Any], Any]]
    max_period: int
    krylov: int
    plain_iter: int
    jacobian: str
    seed: int


def diagnose(
    f: Callable[..., Any],
    z0: Any,
    x: Any = None,
    *,
    restarts: int = 2,
    check: Optional[Callable[[Any, Any], Any]] = None,
    max_period: int = 16,
    krylov: int = 8,
    plain_iter: Optional[int] = None,
    jacobian: str = "auto",
    seed: int = 0,
    **options: Any,
) -> Report:
    """Solve z = f(z, x) as `fpsolve.solve` would (same `options`) and flag, per sample, what is wrong.

    It also runs plain iteration of f (the looped model as it runs), estimates the spectrum
    of ∂f/∂z at the solution, the distance to the true fixed point and the sensitivity to x,
    and restarts from other points. Never raises on a badly behaved map (that is what it is
    for); runs without gradients, and leaves f's modules (training mode, BatchNorm
    statistics) as it found them.

    Args:
        f: The map, as for `solve`.
        z0: The starting point, as for `solve`.
        x: The input, as for `solve`.
        restarts: Extra solves: from the origin, from the mirror image -z*, then from
            random points 1, 3 and 0.3 solution-norms from the solution, in turn (an integer
            >= 0; 0 skips the path check).
        check: `check(z, x) -> ` bool `[B]`: the task's own consistency rule; settled samples
            that fail it get `Flag.INCONSISTENT` (the one reliable way to catch a confident
            wrong fixed point).
        max_period: The longest cycle looked for (>= 1).
        krylov: Arnoldi steps for the spectrum, distance and sensitivity (>= 1).
        plain_iter: Budget of the plain-iteration run; None: max(max_iter, 4 max_period).
        jacobian: How J v is taken: "auto", "forward" (forward-mode AD) or "differences".
        seed: Seed of the random probes and restart points (the diagnosis is reproducible).
        **options: Keyword options of `solve` (solver, atol, rtol, max_iter, halting, norm,
            criterion, check_every); `record` and `backward` are ignored.

    Returns:
        A `Report`: per-sample `flags`, `period`, `spectral_radius`, the `solution`, and
        the evidence; `print(report)` lists the flagged samples worst first.

    Raises:
        TypeError: `check` not callable, or an option that `solve` does not take.
        ValueError: `restarts` < 0, `max_period`, `krylov` or `plain_iter` < 1 or not an
            integer (numpy integers are accepted), an unknown `jacobian`; and any argument
            error `solve` raises.

    Example:
        ```python
        x = torch.tensor([[0.5, 1.0], [1.5, 1.0]])   # per sample: slope, offset
        f = lambda z, x: x[:, :1] * z + x[:, 1:]     # sample 1 (slope 1.5) blows up
        report = fpsolve.diagnose(f, torch.zeros(2, 1), x, solver="fixed_point", max_iter=30)
        assert report.flags[0] == frozenset() and fpsolve.Flag.DIVERGENCE in report.flags[1]
        print(report)
        ```

    Cost (rows of f, per sample): the solve; one evaluation at the solution; the plain run
    (until it settles, at most `plain_iter`); `krylov` Jacobian-vector products (twice that
    when x is floating, for the sensitivity, plus one evaluation at the perturbed x); and
    `restarts` more solves. `report.evaluations` has the exact counts.
    """
    restarts = as_int("restarts", restarts, minimum=0)
    max_period = as_int("max_period", max_period)
    krylov = as_int("krylov", krylov)
    plain_iter = None if plain_iter is None else as_int("plain_iter", plain_iter)
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian={jacobian!r} is not known; use 'auto', 'forward' or 'differences'.")
    if check is not None and not callable(check):
        raise TypeError(f"check must be callable as check(z, x) -> bool tensor [B]; got {type(check).__name__}.")
    options = {k: v for k, v in options.items() if k not in ("record", "backward")}
    opts = Options.make("diagnose", SOLVE_DEFAULTS, options)
    budget = plain_iter if plain_iter is not None else max(opts.max_iter, 4 * max_period)
    settings = Settings(restarts, check, max_period, krylov, budget, jacobian, seed)
    with torch.no_grad(), KeepState(f):
        sol = solve_with(f, z0, x, opts.replace(record=True, backward=None))
        return _examine(f, z0, x, sol, opts, settings)


def _examine(f: Callable[..., Any], z0: Any, x: Any, sol: Solution, opts: Options, settings: Settings) -> Report:
    """Everything after the main solve (runs under no_grad): measure, then decide."""
    layout = StateLayout(z0)
    B = layout.batch
    account = Account.start(sol.evaluations)
    rule = opts.rule
    shown = dict(solver=opts.given["solver"], atol=rule.atol, rtol=rule.rtol, max_iter=opts.max_iter,
                 halting=opts.halting, norm=rule.norm)
    if B == 0:
        return _empty(sol, layout, account, shown)
    gen = torch.Generator().manual_seed(settings.seed)
    fn = layout.wrap(f, x is not None)
    z_star = layout.pack(sol.z)
    problem = Problem(f, flat_fn(fn, z_star.shape), x, layout, z_star.shape, layout.pack(z0).reshape(B, -1), opts)
    point = _at_solution(fn, z_star, problem, account)
    plain = _plain(problem, settings, gen, account)
    linear = analyse(problem, point, settings.krylov, settings.jacobian, gen, account)
    restart_distance, path = search(problem, point, linear.distance,
                                    Search(settings.restarts, settings.plain_iter, settings.seed), gen, account)
    failed = _check(settings.check, sol.z, x, B, layout.device)
    verdict = decide(Measurements(
        status=sol.status, iterations=sol.iterations, max_iter=opts.max_iter, trace=sol.trace,
        residual=point.residual, tolerance=point.tolerance, rule_holds=point.holds,
        criterion=opts.criterion is not None, radius=linear.radius, distance=linear.distance,
        sensitivity=linear.sensitivity, plain=plain, path=path, check_failed=failed, n=problem.width,
        norm=rule.norm))
    return Report(
        flags=verdict.flags, period=plain.period, spectral_radius=linear.radius, solution=sol,
        eigenvalues=linear.eigenvalues, tolerance=point.tolerance, distance=linear.distance,
        contraction=verdict.contraction, sensitivity=linear.sensitivity, restart_distance=restart_distance,
        plain_trace=plain.trace, jacobian=linear.method, evaluations=account.evaluations,
        notes=list(dict.fromkeys(account.notes)), options=shown, sample_notes=verdict.sample_notes,
    )


def _at_solution(fn: Callable[[Tensor, Any], Tensor], z_star: Tensor, problem: Problem, account: Account) -> Point:
    """f at the returned point: the residual, the tolerance of the rule in force, the Newton
    right-hand side."""
    B, rule = problem.batch, problem.opts.rule
    fz = fn(z_star, problem.x).reshape(B, -1)
    account.evaluations["other"] += B
    zf = z_star.reshape(B, -1)
    residual, fnorm = rule.norms(fz - zf, fz)
    return Point(zf, fz, residual, rule.atol + rule.rtol * fnorm, torch.isfinite(fz - zf).all(dim=1),
                 rule.excess(residual, fnorm) <= 0)


def _plain(problem: Problem, settings: Settings, gen: torch.Generator, account: Account) -> Plain:
    """Plain iteration from z0 (a failure is noted: no period, no oscillation assessed)."""
    setup = PlainSetup(settings.plain_iter, settings.max_period, problem.opts.rule, problem.opts.per_sample,
                       torch.finfo(problem.layout.dtype).eps)
    try:
        plain = plain_run(problem.flat_fn, problem.z0, problem.x, setup, gen)
    except Exception as err:   # noqa: BLE001 - reported, never raised
        account.failed("plain iteration", err, "period and oscillation not assessed")
        return Plain.nothing(problem.batch, problem.z0)
    account.evaluations["plain"] = plain.rows
    return plain


def _check(check: Optional[Callable[[Any, Any], Any]], z: Any, x: Any, B: int, dev: torch.device) -> Tensor:
    """bool [B]: where the user's check(z, x) said False (nowhere without a check)."""
    if check is None:
        return torch.zeros(B, dtype=torch.bool, device=dev)
    verdict = torch.as_tensor(check(z, x), device=dev)
    if verdict.shape != (B,):
        raise ValueError(f"check(z, x) must return one bool per sample, shape ({B},); "
                         f"got shape {tuple(verdict.shape)}.")
    return ~verdict.bool()


def _empty(sol: Solution, layout: StateLayout, account: Account, shown: Dict[str, Any]) -> Report:
    """The report of an empty batch."""
    dev = layout.device
    empty = torch.zeros(0, dtype=layout.work_dtype, device=dev)
    return Report(flags=[], period=torch.zeros(0, dtype=torch.int64, device=dev), spectral_radius=empty,
                  solution=sol, eigenvalues=torch.zeros(0, 0, dtype=torch.complex128), tolerance=empty,
                  distance=empty, contraction=empty, sensitivity=empty, restart_distance=empty,
                  plain_trace=empty.view(0, 0), jacobian="none", evaluations=account.evaluations, options=shown)


__all__ = ["diagnose", "Settings"]
