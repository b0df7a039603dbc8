"""The one iteration loop: halting, compaction, best-iterate tracking, divergence, status, trace.

Solvers only propose the next iterate (`solvers._base.Solver`); everything a user reads in a
`Solution` is decided here, the same way for every solver.

Cost per iteration on the fast path (no sample halted, every residual fell): f, one
subtraction, two per-sample norms, four small ops on [B] (addcmul, sub, minimum, min) and ONE
host sync (`.item()`) to decide whether anything needs attention. Only when a sample halts,
diverges or fails to improve does the slow path run (masks, copies of the best iterate, one
gather per field to drop the stopped rows).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ._solution import Solution, Status
from ._tree import select_rows
from .solvers._base import Solver, compact

#: A sample whose residual exceeds this multiple of its starting scale (||f(z0)-z0|| + ||f(z0)||)
#: is DIVERGED, as is one whose residual is not finite.
DIVERGENCE_FACTOR = 1e6


def _norms(g: Tensor, fz: Tensor, dims: Tuple[int, ...], norm: str) -> Tuple[Tensor, Tensor]:
    if norm == "l2":
        return torch.linalg.vector_norm(g, dim=dims), torch.linalg.vector_norm(fz, dim=dims)
    return g.abs().amax(dim=dims), fz.abs().amax(dim=dims)


class _Finished:
    """Rows that stopped together: original indices (None: all rows, in order) and results."""

    __slots__ = ("rows", "z", "residual", "iterations", "converged")

    def __init__(self, rows: Optional[Tensor], z: Tensor, residual: Tensor, iterations: int,
                 converged: Optional[Tensor]) -> None:
        # converged: bool per row (True: CONVERGED, False: DIVERGED), or None for MAX_ITER
        self.rows, self.z, self.residual, self.iterations, self.converged = rows, z, residual, iterations, converged


_CONSTANTS: dict = {}


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor (a Python float operand costs more per op than a cached tensor)."""
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:   # (a sweep over many tolerances must not grow it forever)
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


def iterate(
    fn: Callable[[Tensor, Any], Tensor],
    z0: Tensor,
    x: Any,
    fz0: Tensor,
    solver: Solver,
    *,
    atol: float,
    rtol: float,
    max_iter: int,
    per_sample: bool,
    norm: str,
    record: bool,
) -> Solution:
    """Solve z = fn(z, x) from z0, given fz0 = fn(z0, x); z comes back in the loop's layout.

    Runs under no_grad, except for Unroll(), where autograd records it (decisions then use
    detached norms)."""
    B, dev, dtype = z0.shape[0], z0.device, z0.dtype
    dims = tuple(range(1, z0.ndim))
    bcast = (-1,) + (1,) * (z0.ndim - 1)
    neg_rtol = _constant(-rtol, dtype, dev)
    atol_t = _constant(atol, dtype, dev) if atol > 0 else None

    finished: List[_Finished] = []
    conv_mask = dead_mask = None      # halting="batch" only
    any_dead = False

    idx: Optional[Tensor] = None      # original row of each active row (made at the first drop)
    z, xa, fz = z0, x, fz0
    best_z = best_r = limit = rn0 = fn0 = None
    state = None
    compact_state = getattr(solver, "compact", None) or compact
    n_active, evaluations = B, 0
    trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]] = [] if record else None
    recording = torch.is_grad_enabled()   # Unroll: decisions use detached norms

    k = 0
    while True:
        if k > 0:
            try:
                fz = fn(z, xa)
            except Exception as err:
                if n_active == B:
                    raise
                raise RuntimeError(
                    f"f failed on the {n_active} of {B} rows still active at iteration {k + 1}: "
                    f"{err}. With halting='sample' f receives only the active rows, so anything "
                    f"per-sample must be passed in x (not closed over); use halting='batch' if f "
                    f"needs the whole batch."
                ) from err
            if fz.shape != z.shape:
                raise ValueError(
                    f"f returned shape {tuple(fz.shape)} for a state of shape {tuple(z.shape)} "
                    f"at iteration {k + 1}. With halting='sample' f receives only the rows still "
                    f"active, so it must treat samples independently; use halting='batch' if "
                    f"it mixes them."
                )
        evaluations += n_active
        g = fz - z
        rn, fnorm = _norms(g.detach(), fz.detach(), dims, norm) if recording else _norms(g, fz, dims, norm)
        if trace_rows is not None:
            trace_rows.append((idx, rn))
        excess = torch.addcmul(rn, fnorm, neg_rtol)   # rn - rtol ||fz||; <= atol: halt
        if atol_t is not None:
            excess = excess - atol_t
        # The one host sync of an iteration: is every residual above tolerance and below the
        # sample's best so far? (nan fails the `> 0` test, so non-finite values are caught.)
        if k == 0:
            rn0, fn0 = rn, fnorm
            fast = excess.min().item() > 0
        else:
            fast = torch.minimum(best_r - rn, excess).min().item() > 0
        keep = None
        if fast:
            best_z, best_r = z, rn     # the current iterate is every sample's best: no copy
        else:
            # Slow path: something halted, diverged or got worse.
            if limit is None:
                limit = (rn0 + fn0).mul_(DIVERGENCE_FACTOR)
            if k == 0:   # the start is the best so far, even when its residual is nan
                if not bool(torch.isfinite(z).all()):
                    raise ValueError("z0 contains nan or inf: start from a finite point (zeros, or a previous solution).")
                best_z, best_r = z, rn
            conv_now = excess <= 0
            if k > 0:
                # The best iterate: the smallest residual, except that the iterate at which a
                # sample meets the criterion is taken (so CONVERGED always holds at sol.z), and
                # a sample that already converged (halting="batch") only moves to iterates
                # that meet it too.
                improved = rn < best_r
                if conv_mask is None:
                    improved = improved | conv_now
                else:
                    improved = (improved & (conv_now | ~conv_mask)) | (conv_now & ~conv_mask)
                best_z = torch.where(improved.view(bcast), z, best_z)
                best_r = torch.where(improved, rn, best_r)
            bad = ~(rn <= limit)      # non-finite, or blown up
            if per_sample:
                done = conv_now | bad
                n_done = int(done.sum())      # (a host sync, on the slow path only)
                if n_done == n_active:        # everyone left stops here: no copies
                    finished.append(_Finished(idx, best_z, best_r, k + 1, conv_now))
                    n_active = 0
                    break
                if n_done:
                    # One gather per field: the rows that stay come first (in order), the rows
                    # that stop are the tail, kept as a finished chunk.
                    order = torch.argsort(done, stable=True)
                    n_active -= n_done
                    keep = order[:n_active]
                    if idx is None:
                        idx = order
                    else:
                        idx = idx.index_select(0, order)
                    best_z, best_r, limit, conv_now = (
                        t.index_select(0, order) for t in (best_z, best_r, limit, conv_now))
                    finished.append(_Finished(idx[n_active:], best_z[n_active:], best_r[n_active:],
                                              k + 1, conv_now[n_active:]))
                    idx, best_z, best_r, limit = idx[:n_active], best_z[:n_active], best_r[:n_active], limit[:n_active]
                    xa = select_rows(xa, keep)
            else:
                conv_mask = conv_now if conv_mask is None else conv_mask | conv_now
                dead_mask = bad if dead_mask is None else dead_mask | bad
                all_done, any_dead = torch.stack(((conv_mask | dead_mask).all(), dead_mask.any())).tolist()
                if all_done:
                    break
        if k + 1 >= max_iter:
            break
        # The solver steps on the rows it has seen, then the rows that stopped are dropped
        # from its output (so f(z) and g are never copied).
        if state is None:
            state = solver.init(z, fz, g)
        z, state = solver.step(state, z, fz, g, k)
        if keep is not None:
            z = z.index_select(0, keep)
            state = compact_state(state, keep)
        if any_dead:   # halting="batch": diverged rows stay frozen at their best iterate
            z = torch.where(dead_mask.view(bcast), best_z, z)
        k += 1

    if not per_sample:   # every row received the same evaluations; no row was dropped
        status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
        if dead_mask is not None:
            status = torch.where(dead_mask, int(Status.DIVERGED), status)
            status = torch.where(conv_mask, int(Status.CONVERGED), status)
        iterations = torch.full((B,), k + 1, dtype=torch.int64, device=dev)
        return _result(best_z, best_r, iterations, status, evaluations, trace_rows, B, dtype)
    if n_active:   # budget spent: the rows still active get MAX_ITER
        finished.append(_Finished(idx, best_z, best_r, k + 1, None))
    return _result(*_assemble(finished, B), evaluations, trace_rows, B, dtype)


def _result(z: Tensor, r: Tensor, it: Tensor, status: Tensor, evaluations: int,
            trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]], B: int, dtype: torch.dtype) -> Solution:
    trace = None
    if trace_rows is not None:
        trace = torch.full((len(trace_rows), B), float("nan"), dtype=dtype, device=z.device)
        for t, (ix, rr) in enumerate(trace_rows):
            if ix is None:
                trace[t] = rr
            else:
                trace[t].index_copy_(0, ix, rr)
    return Solution(z=z, iterations=it, residual=r, converged=status == int(Status.CONVERGED),
                    status=status, evaluations=evaluations, trace=trace)


def _assemble(finished: List[_Finished], B: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Put the finished chunks back in the original row order, with their status codes."""
    dev = finished[0].z.device
    codes = [torch.full((c.z.shape[0],), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
             if c.converged is None else torch.where(c.converged, int(Status.CONVERGED), int(Status.DIVERGED))
             for c in finished]
    if len(finished) == 1:   # everyone stopped together and no row was ever dropped
        c = finished[0]
        return c.z, c.residual, torch.full((B,), c.iterations, dtype=torch.int64, device=dev), codes[0]
    # Every chunk has its original rows once one was dropped; they form a permutation.
    inverse = torch.argsort(torch.cat([c.rows for c in finished]))
    its = torch.tensor([c.iterations for c in finished for _ in range(c.z.shape[0])],
                       dtype=torch.int64, device=dev)
    pick = lambda parts: torch.cat(parts).index_select(0, inverse)  # noqa: E731
    return (pick([c.z for c in finished]), pick([c.residual for c in finished]),
            its.index_select(0, inverse), pick(codes))
