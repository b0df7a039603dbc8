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
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint as _checkpoint

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
    the solution as a looped model would. Memory grows with what is recorded.

    `checkpoint=c` (activation checkpointing, `torch.utils.checkpoint`, same gradient): with
    `steps=k` the k passes run in segments of c passes, of which only the input state is kept
    and the passes are recomputed in backward, so memory grows with the k/c segments. With
    `steps=None` every call of f is recomputed in backward (f's inner activations are not
    kept; the state entering each pass and the solver's algebra still are). f must be the
    same map when recomputed: no in-place updates such as BatchNorm's running statistics.
    """

    steps: Optional[int] = None
    checkpoint: Optional[int] = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            check_positive("Unroll(steps=...)", self.steps, integer=True)
        if self.checkpoint is not None:
            check_positive("Unroll(checkpoint=...)", self.checkpoint, integer=True)


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
    """`steps` damped passes of fn from z, recorded by autograd; when fn comes from
    `checkpointed` with segments of c passes, each segment is recomputed in backward (only
    the state entering it is kept)."""
    segment = getattr(fn, "segment", None)
    with torch.enable_grad():
        if segment is None:
            return _passes(fn, z, x, steps, damping)
        for start in range(0, steps, segment):
            n = min(segment, steps - start)
            z = _checkpoint(_passes, fn, z, x, n, damping, use_reentrant=False,
                            context_fn=_same_parametrizations)
    return z


def _passes(fn: Callable[[Tensor, Any], Tensor], z: Tensor, x: Any, n: int, damping: float) -> Tensor:
    for _ in range(n):
        fz = fn(z, x)
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
    return z


def checkpointed(fn: Callable[[Tensor, Any], Tensor], bw: Any) -> Callable[[Tensor, Any], Tensor]:
    """fn itself, or for Unroll(checkpoint=c) fn marked for checkpointing (see `_Checkpointed`)."""
    if isinstance(bw, Unroll) and bw.checkpoint is not None:
        return _Checkpointed(fn, bw.checkpoint, per_call=bw.steps is None)
    return fn


class _Checkpointed:
    """f for Unroll(checkpoint=c). steps=None: each call made with autograd on goes through
    `torch.utils.checkpoint` (recomputed in backward). steps=k: calls are plain, and
    `phantom_steps` reads `segment` to run the k passes in checkpointed segments of c."""

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], segment: int, per_call: bool) -> None:
        self.fn, self.per_call = fn, per_call
        self.segment = None if per_call else segment

    def __call__(self, z: Tensor, x: Any) -> Tensor:
        if self.per_call and torch.is_grad_enabled():
            return _checkpoint(self.fn, z, x, use_reentrant=False, context_fn=_same_parametrizations)
        return self.fn(z, x)


def _same_parametrizations() -> "tuple[_CacheNote, _CacheReplay]":
    """Checkpoint contexts that replay f with the parametrization cache it ran with.

    `DEQ` computes parametrized weights (spectral_norm, ...) once per forward under
    `parametrize.cached()`; backward runs after that context is closed, so the recomputation
    would compute them again (and a power iteration would move on): f would be another map.
    The forward context notes the cache at entry; every recomputation runs with that cache.
    """
    note = _CacheNote()
    return note, _CacheReplay(note)


class _CacheNote:
    """Forward context: notes torch's parametrization cache, if it is on (the module globals
    `_cache_enabled` and `_cache` of torch.nn.utils.parametrize, read defensively: private)."""

    cache: Optional[dict] = None

    def __enter__(self) -> None:
        if getattr(parametrize, "_cache_enabled", 0) and isinstance(getattr(parametrize, "_cache", None), dict):
            self.cache = dict(parametrize._cache)

    def __exit__(self, *exc: Any) -> None:
        return None


class _CacheReplay:
    """Recomputation context (entered once per backward): the noted cache, switched on."""

    def __init__(self, note: _CacheNote) -> None:
        self.note, self.before = note, None

    def __enter__(self) -> None:
        if self.note.cache is not None:
            self.before = parametrize._cache_enabled, parametrize._cache
            parametrize._cache_enabled, parametrize._cache = self.before[0] + 1, dict(self.note.cache)

    def __exit__(self, *exc: Any) -> None:
        if self.before is not None:
            parametrize._cache_enabled, parametrize._cache = self.before
            self.before = None


class _AdjointRunner:
    """Holds f(z*, x) with its graph and solves the adjoint when backward asks."""

    def __init__(self, out: Tensor, zs: Tensor, solve_adjoint: Callable[..., Any]) -> None:
        self.out, self.zs, self.solve_adjoint = out, zs, solve_adjoint
        self.solution: Any = None    # the forward Solution, to receive `adjoint`

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
