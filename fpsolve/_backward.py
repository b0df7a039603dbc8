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

from ._checks import as_float, as_int, as_tolerances
from ._tree import select_rows
from .solvers._base import Solver


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
            from ._solve import make_solver   # (deferred: _solve imports this module)
            make_solver(self.solver)


@dataclass(frozen=True)
class Phantom:
    """Phantom gradient: backpropagate through `steps` damped steps taken from the solution.

    The steps z <- (1-λ) z + λ f(z, x) run from the fixed point with autograd on; the gradient
    is that of those steps (an approximation of the implicit one, cheap and often good enough
    to train with). Phantom(steps=1, damping=1.0) is Jacobian-free backpropagation (Fung et
    al. 2022; Geng et al., "On training implicit models", NeurIPS 2021). `backward="phantom"`
    is `Phantom()`.

    Args:
        steps: The number of damped steps recorded (an integer >= 1).
        damping: λ, in (0, 1].

    Raises:
        TypeError: `steps` not an integer, or `damping` not a number.
        ValueError: `steps` < 1 or `damping` outside (0, 1].

    Example:
        ```python
        x = torch.ones(2, 3, requires_grad=True)
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), x, rtol=1e-8,
                            backward=fpsolve.Phantom(steps=1, damping=1.0))
        sol.z.sum().backward()   # one step f(z*, x) = 0.5 z* + x: d/dx = 1 (implicit: 2)
        assert torch.allclose(x.grad, torch.ones(2, 3))
        ```
    """

    steps: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", as_int("Phantom(steps=...)", self.steps))
        object.__setattr__(self, "damping", as_float("Phantom(damping=...)", self.damping, strict=True, at_most=1.0))


@dataclass(frozen=True)
class Unroll:
    """Backpropagation through the iterations themselves: the baseline other modes are judged against.

    `steps=None` records the whole forward solve (the solver's own algebra included);
    `steps=k` records the last k passes of f, run from the solution as a looped model would.
    Memory grows with what is recorded. `backward="unroll"` is `Unroll()`.

    `checkpoint=c` (activation checkpointing, `torch.utils.checkpoint`, same gradient): with
    `steps=k` the k passes run in segments of c passes, of which only the input state is kept
    and the passes are recomputed in backward, so memory grows with the k/c segments. With
    `steps=None` every call of f is recomputed in backward (f's inner activations are not
    kept; the state entering each pass and the solver's algebra still are). f must be the
    same map when recomputed: no in-place updates such as BatchNorm's running statistics.

    Args:
        steps: None: the whole forward solve; k: k passes of f from the solution.
        checkpoint: None: keep every activation; c: activation checkpointing in segments
            of c passes (same gradient, less memory, more compute).

    Raises:
        TypeError: `steps` or `checkpoint` not an integer.
        ValueError: `steps` or `checkpoint` < 1.

    Example:
        ```python
        x = torch.ones(2, 3, requires_grad=True)
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), x, solver="fixed_point",
                            rtol=1e-10, backward=fpsolve.Unroll())
        sol.z.sum().backward()   # through every pass: 1 + 0.5 + 0.25 + ... -> 2
        assert torch.allclose(x.grad, torch.full((2, 3), 2.0), atol=1e-6)
        ```
    """

    steps: Optional[int] = None
    checkpoint: Optional[int] = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            object.__setattr__(self, "steps", as_int("Unroll(steps=...)", self.steps))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", as_int("Unroll(checkpoint=...)", self.checkpoint))


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


def _vjp(out: Tensor, z: Tensor, v: Tensor) -> Tensor:
    """v ∂out/∂z through a kept graph (zero when out does not depend on z)."""
    w = torch.autograd.grad(out, z, v, retain_graph=True, allow_unused=True)[0]
    return torch.zeros_like(v) if w is None else w


#: f on a subset of rows must give the rows of f on the batch to this many units of rounding
#: (relative to the largest entry), or the adjoint keeps the whole-batch graph.
ROWS_TOLERANCE = 64


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
    """Holds f(z*, x) with its graph and solves the adjoint when backward asks.

    `runner(v)` is v ∂f/∂z at z* over the whole batch. `on_rows(rows)` is the same product
    for the rows `rows` alone, through a graph of f built once on z*[rows], x[rows] (so rows
    that halted cost nothing). It is None (the caller then keeps the whole batch) when f
    fails on those rows, returns another shape (f closed over per-batch tensors), or returns
    other values than on the whole batch (f changes per call: nn.Dropout in train mode, a
    spectral_norm hook's power iteration, train-mode BatchNorm).
    """

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], x: Any, out: Tensor, zs: Tensor,
                 solve_adjoint: Callable[..., Any]) -> None:
        self.fn, self.x, self.out, self.zs, self.solve_adjoint = fn, x, out, zs, solve_adjoint
        self.rows_fail = False       # f failed on a subset once: never try again
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
        u, adjoint = runner.solve_adjoint(runner, grad)
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
    """z* carrying the implicit gradient; `solve_adjoint(vjp, g) -> (u, adjoint Solution)`,
    where `vjp` is an `_AdjointRunner` (callable, with `on_rows`)."""
    check_transforms("implicit")
    zs = z_star.detach().requires_grad_()
    with torch.enable_grad():
        out = fn(zs, x)
    runner = _AdjointRunner(fn, x, out, zs, solve_adjoint)
    return _ImplicitFunction.apply(out, z_star.detach(), runner), runner


def check_transforms(backward: Any) -> None:
    """A clear error for torch.func transforms that fpsolve cannot run under (call it first).

    vmap: solve is batched over dimension 0 already and decides halting on the host, so it
    cannot be vmapped. torch.func.grad & co. through Implicit: its adjoint runs torch.autograd
    on a kept graph, which functorch forbids. Both errors say what to use instead.
    """
    if not torch._C._are_functorch_transforms_active():
        return
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType

    kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    if TransformType.Vmap in kinds:
        raise RuntimeError(
            "torch.func.vmap over fpsolve.solve is not supported: solve is already batched "
            "over dimension 0, with per-sample halting and status. Stack the problems along "
            "dimension 0 and make one call (x of shape [B, ...], z0 of shape [B, ...]) instead."
        )
    if isinstance(backward, Implicit) or backward == "implicit":
        raise RuntimeError(
            "torch.func.grad (or vjp/jacrev) through backward='implicit' is not supported: the "
            "implicit adjoint runs torch.autograd on a kept graph. Use torch.autograd.grad or "
            "loss.backward() (ordinary autograd gives the implicit gradient), or, inside "
            "torch.func transforms, backward='unroll' or fpsolve.Phantom(...)."
        )
