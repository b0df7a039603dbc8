"""How `sol.z` gets its gradient: a strategy object that runs the solve and attaches it.

`Implicit` (in `_implicit`), `Phantom` and `Unroll` each own their run (`apply(run)`): they
decide whether autograd records the loop and what is recorded after it, as optimistix's
adjoints do. `make_backward` is the registry of names. Every mode reaches `x` and every
tensor f uses (module parameters, closed-over tensors) without the user listing them: the
gradient always flows through a graph of f built by autograd, never a hand-kept list.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._checks import as_float, as_int
from ._criteria import Depth
from ._replay import same_map
from ._implicit import Implicit
from ._run import Run
from ._rules import finite_dead_rows, live_rows
from ._solution import Solution, Status
from ._tree import leaves, rebuild, select_rows, tensors_in

Map = Callable[[Tensor, Any], Tensor]


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

    records_forward = False   # (the forward runs without autograd; the steps are recorded after it)

    def apply(self, run: Run) -> Solution:
        """Run the forward without autograd, then `steps` damped passes from sol.z with it.

        Under `Depth(K)`: the last `steps` of the K passes (the first K - steps without autograd).

        Args:
            run: The solve as the loop sees it (`fpsolve._run.Run`), made by `solve`.

        Returns:
            The forward's `Solution`, its `z` (loop layout) carrying the phantom gradient.
        """
        if run.criterion is not None and run.criterion.depth() is not None:
            if self.damping != 1.0:
                raise ValueError(f"Phantom(damping={self.damping}) under fpsolve.Depth: the last passes of a "
                                 f"fixed-depth loop are f itself; use Phantom(steps=k, damping=1.0) or Unroll(steps=k).")
            return last_passes(run, self.steps)
        with torch.no_grad():
            sol = run.forward()
        sol.z = phantom_gradient(run.fn, sol.z, sol.status, run.x, self.steps, self.damping, run.per_sample)
        return sol


@dataclass(frozen=True)
class Unroll:
    """Backpropagation through the iterations themselves: the baseline other modes are judged against.

    `steps=None` records the whole forward solve (the solver's own algebra included);
    `steps=k` records the last k passes of f, run from the solution as a looped model would.
    Memory grows with what is recorded. `backward="unroll"` is `Unroll()`.

    `checkpoint=c` (activation checkpointing, `torch.utils.checkpoint`, same gradient): the
    recorded passes run in segments of c passes, and backward runs each segment again from
    what was kept at its start, so memory grows with the segments, not the passes. With
    `steps=k`, a segment keeps the state entering it. With `steps=None`, a segment keeps the
    loop's state entering it: the iterate, the solver's state (Anderson's and Broyden's
    histories), the active rows' inputs and a few per-row indices; not each row's best
    iterate, whose value reaches only the answer. Its replay runs f and the solver's steps
    again and drops the rows the forward dropped where it dropped them (a replay whose rows
    stop elsewhere raises), so the gradient is `Unroll()`'s; the forward, its statuses,
    iterations and trace are `Unroll()`'s too. f must be deterministic and the same map when
    recomputed: no in-place updates such as BatchNorm's running statistics.

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

    @property
    def records_forward(self) -> bool:
        """Whether autograd records the forward solve itself (steps=None).

        Returns:
            True for `Unroll()`; False for `Unroll(steps=k)` (only the last k passes are recorded).
        """
        return self.steps is None

    def apply(self, run: Run) -> Solution:
        """Run the forward recorded by autograd (steps=None), or run it plain and record k passes.

        steps=None: the forward solve recorded by autograd, solver algebra included (a look at
        every pass: the graph must hold no pass after a sample stopped, whose algebra may be
        non-finite), in checkpointed segments with `checkpoint` (`recorded_forward`). steps=k:
        the forward without autograd, then k passes from sol.z with it; under `Depth(K)` the
        last k of the K passes (the first K - k run without autograd).

        Args:
            run: The solve as the loop sees it (`fpsolve._run.Run`), made by `solve`.

        Returns:
            The `Solution`, its `z` (loop layout) carrying the gradient of the recorded passes.
        """
        if self.steps is not None and run.criterion is not None and run.criterion.depth() is not None:
            return last_passes(run, self.steps, self.checkpoint)
        if self.steps is None:
            fn, every = run.fn, self.checkpoint
            with torch.enable_grad():
                sol = recorded_forward(run, every)
                rows = live_rows(sol.status)
                if rows is not None and rows.numel() and run.per_sample:
                    # A diverged row's passes are in the graph (0 * nan reaches shared
                    # parameters): the live rows are recorded again without it (f treats
                    # samples independently under halting="sample", so their values agree).
                    # The live rows' whole result is the re-recorded run's, so that their statuses
                    # and residuals hold at the z returned (a stateful f sees more calls).
                    x = select_rows(run.x, rows)
                    z0 = run.z0.index_select(0, rows)
                    alone = recorded_forward(run, every, z0=z0, x=x, fz0=fn(z0, x))
                    sol.z = sol.z.detach().index_copy(0, rows, alone.z)
                    for name in ("iterations", "residual", "status", "converged"):
                        setattr(sol, name, getattr(sol, name).index_copy(0, rows, getattr(alone, name)))
                    sol.evaluations += alone.evaluations
                    if sol.trace is not None:   # (the live rows' history is the re-run's)
                        T = int(sol.iterations.max())
                        trace = sol.trace.new_full((T, sol.trace.shape[1]), float("nan"))
                        trace[:min(T, sol.trace.shape[0])] = sol.trace[:T]
                        trace[:, rows] = float("nan")
                        trace[:alone.trace.shape[0], rows] = alone.trace
                        sol.trace = trace
                elif rows is not None and rows.numel():
                    # halting="batch": the batch is recorded again with the dead rows held at
                    # their start and their non-finite inputs zeroed (their outputs are masked
                    # out, and meet only finite numbers in backward); the live rows' result is
                    # the re-run's (the same passes when f treats samples independently).
                    dead = sol.status == int(Status.DIVERGED)
                    x = finite_dead_rows(run.x, sol.status)
                    again = recorded_forward(run, every, x=x, fz0=fn(run.z0, x), frozen=dead)
                    keep = ~dead
                    sol.z = torch.where(keep.view((-1,) + (1,) * (sol.z.ndim - 1)), again.z, sol.z.detach())
                    for name in ("residual", "status", "converged"):
                        setattr(sol, name, torch.where(keep, getattr(again, name), getattr(sol, name)))
                    sol.iterations = again.iterations   # (one count for the batch: the re-run's)
                    sol.evaluations += again.evaluations
                    if sol.trace is not None:   # (a trace row per pass of the batch's count)
                        T = int(sol.iterations.max())
                        sol.trace = torch.where(keep[None], _rows_of(again.trace, T), _rows_of(sol.trace, T))
                elif rows is not None:
                    sol.z = sol.z.detach()
            return sol
        with torch.no_grad():
            sol = run.forward()
        sol.z = phantom_gradient(run.fn, sol.z, sol.status, run.x, self.steps, 1.0, run.per_sample,
                                 segment=self.checkpoint)
        return sol


def _rows_of(trace: Tensor, T: int) -> Tensor:
    """A trace cut or padded (nan: no pass) to T passes."""
    out = trace.new_full((T,) + tuple(trace.shape[1:]), float("nan"))
    n = min(T, trace.shape[0])
    out[:n] = trace[:n]
    return out


Backward = Union[Implicit, "Phantom", "Unroll"]
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


def last_passes(run: Run, steps: int, segment: Optional[int] = None) -> Solution:
    """Fixed depth K with the gradient of its last `steps` passes: K - steps passes without
    autograd, then the last ones recorded (in checkpointed segments of `segment` passes);
    `sol.z` is z_K itself, as a looped model trained with truncated backpropagation returns."""
    K = run.criterion.depth()
    k = min(steps, K)
    with torch.no_grad():
        if k < K:
            sol = run.forward(criterion=run.criterion.replaced(Depth(K - k)))
            z, status = sol.z, sol.status
        else:   # (every pass recorded: from z0)
            sol = run.forward(criterion=run.criterion.replaced(Depth(1)), fz0=run.fz0.detach())
            z, status = run.z0, torch.zeros_like(sol.status)
    ok = status != int(Status.DIVERGED)
    rows = None if bool(ok.all()) else ok.nonzero().squeeze(1)
    zs, xs = (z, run.x) if rows is None else (z.index_select(0, rows), select_rows(run.x, rows))
    with torch.enable_grad():
        prev = phantom_steps(run.fn, zs, xs, k - 1, 1.0, segment) if k > 1 else zs
        last = run.fn(prev, xs)
    fine = torch.isfinite(last.detach()).flatten(1).all(dim=1)
    step = run.rule.norms((last - prev).detach(), last.detach())[0]
    if rows is None:
        rows = torch.arange(z.shape[0], device=z.device)
    keep = rows[fine]
    new_z = z.detach().index_copy(0, keep, last[fine])
    sol.z = new_z
    sol.status = sol.status.clone()
    sol.status[rows[~fine]] = int(Status.DIVERGED)
    sol.status[keep] = int(Status.HALTED)
    sol.iterations = sol.iterations.clone()
    sol.iterations[keep] = K
    sol.residual = sol.residual.clone()
    sol.residual[keep] = step[fine].to(sol.residual.dtype)
    sol.converged = sol.status == int(Status.HALTED)
    sol.evaluations += int(rows.numel()) * k
    return sol


# --- the phantom gradient: k recorded passes from a point ----------------------------------

def phantom_gradient(fn: Map, z: Tensor, status: Tensor, x: Any, steps: int, damping: float, per_sample: bool,
                     segment: Optional[int] = None) -> Tensor:
    """z (its value unchanged) carrying the gradient of `steps` damped passes of f from it
    (Phantom, Unroll(steps=k), Correction); `segment`: checkpointed segments of that many passes.

    DIVERGED rows keep their finite value without a gradient: with per-sample halting they are
    left out of the passes (their non-finite f would poison shared parameters' gradients);
    under halting="batch" (f may mix rows) their part of the graph is masked out.
    """
    ok = status != int(Status.DIVERGED)
    if bool(ok.all()):
        return z + _finite_delta(phantom_steps(fn, z, x, steps, damping, segment))
    if per_sample:
        rows = ok.nonzero().squeeze(1)
        if rows.numel() == 0:
            return z
        graph = phantom_steps(fn, z.index_select(0, rows), select_rows(x, rows), steps, damping, segment)
        return z + torch.zeros_like(z).index_copy(0, rows, _finite_delta(graph))
    # halting="batch": f may mix rows, so a diverged row stays frozen at its value through the
    # passes (else its non-finite f would reach every row at the next pass).
    mask = ok.view((-1,) + (1,) * (z.ndim - 1))
    frozen = z.detach()
    x = finite_dead_rows(x, status)   # (the frozen rows' f must stay finite: see `live_rows`)
    graph = phantom_steps(lambda zz, xa: torch.where(mask, fn(zz, xa), frozen), z, x, steps, damping, segment)
    return z + torch.where(mask, _finite_delta(graph), torch.zeros_like(graph))


def _finite_delta(graph: Tensor) -> Tensor:
    """graph - graph.detach() (zero valued, carrying graph's gradient), and zero without a
    gradient on a row where the passes turned non-finite (so sol.z never does)."""
    finite = torch.isfinite(graph.detach()).flatten(1).all(dim=1).view((-1,) + (1,) * (graph.ndim - 1))
    return torch.where(finite, graph - graph.detach(), torch.zeros_like(graph))


def phantom_steps(fn: Map, z: Tensor, x: Any, steps: int, damping: float, segment: Optional[int] = None) -> Tensor:
    """`steps` damped passes of fn from z, recorded by autograd; with `segment` = c, in
    checkpointed segments of c passes (only the state entering each is kept, and the passes
    are recomputed in backward)."""
    with torch.enable_grad():
        if segment is None:
            return _passes(fn, z, x, steps, damping)
        for start in range(0, steps, segment):
            n = min(segment, steps - start)
            z = _checkpoint(_passes, fn, z, x, n, damping, use_reentrant=False,
                            context_fn=same_map)
    return z


def _passes(fn: Map, z: Tensor, x: Any, n: int, damping: float) -> Tensor:
    for _ in range(n):
        fz = fn(z, x)
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
    return z


# --- the whole forward recorded, in checkpointed segments ------------------------------------

def recorded_forward(run: Run, every: Optional[int], **changes: Any) -> Solution:
    """The forward solve recorded by autograd, a look every pass (`Unroll()`); with `every` = c,
    in checkpointed segments of c passes (`Unroll(checkpoint=c)`).

    A segment keeps only the loop's state entering it (its `CARRY` fields: the iterate, the
    solver's state, the active rows' inputs and bookkeeping), except the fields whose values
    reach only the answers (`answer_only`: each row's best iterate), which the segment's
    forward gets and then lets go (unless a batch row was frozen at it in the segment: then
    it reached f, and is kept). In backward the passes (f, the solver's steps, the rows
    dropped) run again from that state and take the forward's decisions (the same values,
    bit for bit; checkpoint checks that every recomputed tensor has its forward shape)."""
    loop = run.loop(check_every=1, **changes)
    loop.start()
    while not loop.stopped:
        if every is None:
            loop.advance()
            continue
        loose = loop.answer_only()
        held = {name: getattr(loop, name) for name in loose}
        start = copy.copy(loop)   # (kept by the checkpoint: without the answer-only values)
        for name in loose:
            setattr(start, name, None)
        tensors = tensors_in(tuple(getattr(start, name) for name in start.CARRY))
        loop = _checkpoint(_segment, start, every, held, [], *tensors, use_reentrant=False, context_fn=same_map)
        if set(loop.answer_only()) >= set(loose):   # (still answer-only at the segment's end)
            for name, value in list(held.items()):
                held[name] = value if value is None else _stand_in(value)
    return loop.finish()


def _stand_in(t: Tensor) -> Tensor:
    """Zeros shaped like t, without its memory (one element, expanded), requiring grad as t does
    (so that the replay's ops on it save the tensors the forward's saved)."""
    return t.new_zeros(()).requires_grad_(t.requires_grad).expand(t.shape)


def _segment(start: Any, passes: int, held: Dict[str, Any], trail: List[Tuple[int, ...]], *tensors: Tensor) -> Any:
    """`passes` passes of a copy of the loop `start` whose carried fields hold `tensors` and the
    answer-only values `held` (in backward: zeros of their shape, as no saved tensor depends on
    them); `start`, kept by the checkpoint as the segment's input, is never changed. The forward
    notes its decisions in `trail`; a replay that decides otherwise raises."""
    loop = copy.copy(start)
    items = iter(tensors)
    fresh = lambda leaf: next(items) if isinstance(leaf, Tensor) else (  # noqa: E731
        leaf.copy() if isinstance(leaf, np.ndarray) else leaf)             # (host arrays: own copies)
    for name in loop.CARRY:
        value = getattr(loop, name)
        setattr(loop, name, rebuild(value, (fresh(leaf) for leaf in leaves(value))))
    for name, value in held.items():
        setattr(loop, name, value)
    for name in ("finished", "trace_rows", "kept"):   # (outputs: the segment appends its own)
        if getattr(loop, name, None) is not None:
            setattr(loop, name, list(getattr(loop, name)))
    replay = bool(trail)
    for i in range(passes):
        if loop.stopped:
            break
        loop.advance()
        if not replay:
            trail.append(loop.decisions())
        elif trail[i] != loop.decisions():
            raise RuntimeError(
                "fpsolve: Unroll(checkpoint=c) recomputed a segment of passes in backward, and its rows "
                "stopped elsewhere than in the forward: f (or the solver) did not give the same values "
                "again. f must be deterministic (on a GPU, torch.use_deterministic_algorithms(True)) "
                "and the same map (no in-place state such as BatchNorm's running statistics).")
    return loop


__all__ = ["Implicit", "Phantom", "Unroll", "Backward", "make_backward", "phantom_gradient", "phantom_steps", "recorded_forward"]
