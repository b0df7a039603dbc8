"""How `sol.z` gets its gradient: `Implicit`, `Phantom`, `Unroll` (strategy objects).

Every mode reaches `x` and every tensor f uses (module parameters, closed-over tensors)
without the user listing them: the gradient always flows through a graph of f built by
autograd, never through a hand-kept parameter list.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .solvers._base import Solver, check_positive


class ConvergenceWarning(UserWarning):
    """A solve that a gradient depends on did not converge (e.g. the implicit adjoint)."""


@dataclass(frozen=True)
class Implicit:
    """Implicit function theorem: solve the adjoint u = u ∂f/∂z + g per sample, then one VJP.

    Memory does not grow with the forward iterations (only one evaluation of f at z* is kept).
    Options left as None are taken from the forward solve. The adjoint's own result is put in
    `sol.adjoint` (a `Solution`) when backward runs; samples whose adjoint did not converge
    raise a `ConvergenceWarning`.
    """

    solver: Union[str, Solver, None] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    max_iter: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_iter is not None:
            check_positive("Implicit(max_iter=...)", self.max_iter, integer=True)
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"Implicit({name}=...) must be a number >= 0; got {v!r}.")


@dataclass(frozen=True)
class Phantom:
    """Phantom gradient: `steps` damped steps z <- (1-λ) z + λ f(z, x) from the solution, with
    autograd on. Phantom(steps=1, damping=1.0) is Jacobian-free backpropagation (Fung et al.
    2022; Geng et al., "On training implicit models", NeurIPS 2021)."""

    steps: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_positive("Phantom(steps=...)", self.steps, integer=True)
        check_positive("Phantom(damping=...)", self.damping, at_most=1.0)


@dataclass(frozen=True)
class Unroll:
    """Backpropagation through the iterations: `steps=None` records the whole forward solve
    (the solver's own algebra included); `steps=k` records the last k passes of f, run from
    the solution as a looped model would. Memory grows with what is recorded."""

    steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            check_positive("Unroll(steps=...)", self.steps, integer=True)


Backward = Union[Implicit, Phantom, Unroll]
_NAMES = {"implicit": Implicit, "phantom": Phantom, "unroll": Unroll}


def make_backward(backward: Any) -> Optional[Backward]:
    """A backward object from a name, an object, or None for "none"."""
    if isinstance(backward, str):
        if backward == "none":
            return None
        if backward in _NAMES:
            return _NAMES[backward]()
        raise ValueError(
            f"backward={backward!r} is not known; use one of {sorted(_NAMES) + ['none']} or "
            f"an object such as fpsolve.Implicit(), fpsolve.Phantom(steps=5, damping=0.5)."
        )
    if isinstance(backward, (Implicit, Phantom, Unroll)):
        return backward
    raise TypeError(
        f"backward must be 'implicit', 'phantom', 'unroll', 'none' or an Implicit/Phantom/"
        f"Unroll object; got {backward!r}."
    )


def with_value(value: Tensor, graph: Tensor) -> Tensor:
    """A tensor equal to `value` whose gradient is that of `graph` (same shape)."""
    return value + (graph - graph.detach())


def phantom_steps(fn: Callable[[Tensor, Any], Tensor], z: Tensor, x: Any, steps: int, damping: float) -> Tensor:
    """`steps` damped passes of fn from z, recorded by autograd."""
    with torch.enable_grad():
        for _ in range(steps):
            fz = fn(z, x)
            z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
    return z


class _AdjointRunner:
    """Holds f(z*, x) with its graph and solves the adjoint when backward asks."""

    def __init__(self, out: Tensor, zs: Tensor, solve_adjoint: Callable[..., Any]) -> None:
        self.out, self.zs, self.solve_adjoint = out, zs, solve_adjoint
        self.solution: Any = None    # the forward Solution, to receive `adjoint`
        self.rule: Any = None        # the forward's residual rule (fpsolve.Residual)

    def warn_if_not_fixed_points(self) -> None:
        """The implicit gradient assumes z* = f(z*): warn for samples that are not there (budget
        spent, or HALTED by a read-out criterion where the residual rule does not hold)."""
        sol, rule = self.solution, self.rule
        if sol is None or rule is None:
            return
        with torch.no_grad():
            out, zs = self.out.detach(), self.zs.detach()
            dims = tuple(range(1, out.ndim))
            if rule.norm == "l2":
                r, s = torch.linalg.vector_norm(out - zs, dim=dims), torch.linalg.vector_norm(out, dim=dims)
            else:
                r, s = (out - zs).abs().amax(dim=dims), out.abs().amax(dim=dims)
            off = ~(r <= rule.atol + rule.rtol * s) & (sol.status != 2)   # (DIVERGED rows are reported as such)
        n = int(off.sum())
        if n:
            warnings.warn(
                f"backward='implicit' differentiates through a fixed point, but {n} of {off.numel()} "
                f"samples are not at one (status {sol.status[off].tolist()[:8]}: budget spent or halted "
                f"by a read-out criterion); their gradients are approximate. Raise max_iter, or use "
                f"backward='unroll' / fpsolve.Phantom(...) to differentiate the passes actually run.",
                ConvergenceWarning,
                stacklevel=3,
            )

    def vjp(self, v: Tensor) -> Tensor:
        w = torch.autograd.grad(self.out, self.zs, v, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(v) if w is None else w   # f that ignores z: J = 0


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
        u, adjoint = runner.solve_adjoint(runner.vjp, grad)
        if runner.solution is not None:
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


def implicit_attach(fn: Callable[[Tensor, Any], Tensor], z_star: Tensor, x: Any,
                    solve_adjoint: Callable[..., Any]) -> "tuple[Tensor, _AdjointRunner]":
    """z* carrying the implicit gradient; `solve_adjoint(vjp, g) -> (u, adjoint Solution)`."""
    zs = z_star.detach().requires_grad_()
    with torch.enable_grad():
        out = fn(zs, x)
    runner = _AdjointRunner(out, zs, solve_adjoint)
    return _ImplicitFunction.apply(out, z_star.detach(), runner), runner
