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

import math
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ._criteria import Residual, compact_state as compact_rows
from ._solution import Solution, Status
from ._tree import select_rows
from .solvers._base import Solver, compact

#: A sample is DIVERGED when its residual is not finite, or exceeds this multiple of its
#: starting scale: max(||f(z0)-z0|| + ||f(z0)||, the norm of an all-ones sample). The floor
#: keeps a bounded map that starts near 0 (tanh(2z + 1e-9)) from being called divergent.
DIVERGENCE_FACTOR = 1e6


def _norms(g: Tensor, fz: Tensor, dims: Tuple[int, ...], norm: str) -> Tuple[Tensor, Tensor]:
    if norm == "l2":
        return torch.linalg.vector_norm(g, dim=dims), torch.linalg.vector_norm(fz, dim=dims)
    return g.abs().amax(dim=dims), fz.abs().amax(dim=dims)


class _Finished:
    """Rows that stopped together: original indices (None: all rows, in order) and results."""

    __slots__ = ("rows", "z", "residual", "iterations", "status")

    def __init__(self, rows: Optional[Tensor], z: Tensor, residual: Tensor, iterations: int,
                 status: Optional[Tensor]) -> None:
        # status: int64 per row, or None for MAX_ITER
        self.rows, self.z, self.residual, self.iterations, self.status = rows, z, residual, iterations, status


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


class Halt:
    """A criterion other than the residual rule, seen by the loop on packed tensors."""

    def __init__(self, criterion: Any, unpack: Callable[[Tensor], Any]) -> None:
        self.criterion, self.unpack = criterion, unpack

    def init(self, z: Tensor) -> Any:
        return self.criterion.init(self.unpack(z), z.shape[0], z.device)

    def __call__(self, z: Tensor, fz: Tensor, state: Any) -> Tuple[Tensor, Any]:
        mask, state = self.criterion.check(self.unpack(z), self.unpack(fz), state)
        return mask.to(device=z.device, dtype=torch.bool), state


def _call_f(fn: Callable[[Tensor, Any], Tensor], z: Tensor, xa: Any, k: int, n_active: int, B: int) -> Tensor:
    """One evaluation of f after the first; f's own exceptions reach the caller unchanged."""
    try:
        fz = fn(z, xa)
    except Exception as err:
        if n_active < B and hasattr(err, "add_note"):
            err.add_note(
                f"fpsolve: f failed on the {n_active} of {B} rows still active at iteration {k + 1}. "
                f"With halting='sample' f receives only the active rows, so anything per-sample must "
                f"be passed in x (not closed over); use halting='batch' if f needs the whole batch."
            )
        raise
    if not isinstance(fz, Tensor) or fz.shape != z.shape or fz.dtype != z.dtype:
        got = (f"shape {tuple(fz.shape)}, dtype {fz.dtype}" if isinstance(fz, Tensor)
               else type(fz).__name__)
        hint = ("" if n_active == B else " With halting='sample' f receives only the rows still "
                "active, so it must treat samples independently; use halting='batch' if it mixes them.")
        raise ValueError(
            f"f returned {got} at iteration {k + 1} for a state of shape {tuple(z.shape)}, dtype "
            f"{z.dtype}: f must return a state shaped like z.{hint}"
        )
    return fz


def iterate(
    fn: Callable[[Tensor, Any], Tensor],
    z0: Tensor,
    x: Any,
    fz0: Tensor,
    solver: Solver,
    *,
    rule: Residual,
    halt: Optional[Halt] = None,
    max_iter: int,
    per_sample: bool,
    record: bool,
    round_fn: Optional[Callable[[Tensor], Tensor]] = None,
) -> Solution:
    """Solve z = fn(z, x) from z0, given fz0 = fn(z0, x); z comes back in the loop's layout.

    `rule` is the residual rule (it decides CONVERGED and the reported residual's norm); with
    `halt`, that criterion decides instead and its halts are HALTED. `round_fn` maps each new
    iterate to the user's precision (float16/bfloat16), so statuses hold at the returned values.
    Runs under no_grad, except for Unroll(), where autograd records it (decisions then use
    detached norms)."""
    B, dev, dtype = z0.shape[0], z0.device, z0.dtype
    dims = tuple(range(1, z0.ndim))
    bcast = (-1,) + (1,) * (z0.ndim - 1)
    norm = rule.norm
    neg_rtol = _constant(-rule.rtol, dtype, dev)
    atol_t = _constant(rule.atol, dtype, dev) if rule.atol > 0 else None
    done_code = int(Status.CONVERGED) if halt is None else int(Status.HALTED)
    floor = math.sqrt(z0[0].numel()) if norm == "l2" else 1.0

    finished: List[_Finished] = []
    dead_mask = None                  # halting="batch" only
    any_dead = False

    idx: Optional[Tensor] = None      # original row of each active row (made at the first drop)
    z, xa, fz = z0, x, fz0
    best_z = best_r = limit = None
    state = None
    hstate = halt.init(z0) if halt is not None else None
    compact_state = getattr(solver, "compact", None) or compact
    n_active, evaluations = B, 0
    trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]] = [] if record else None
    recording = torch.is_grad_enabled()   # Unroll: decisions use detached norms
    one, minus_one = _constant(1.0, dtype, dev), _constant(-1.0, dtype, dev)

    k = 0
    while True:
        if k > 0:
            fz = _call_f(fn, z, xa, k, n_active, B)
        evaluations += n_active
        g = fz - z
        rn, fnorm = _norms(g.detach(), fz.detach(), dims, norm) if recording else _norms(g, fz, dims, norm)
        if trace_rows is not None:
            trace_rows.append((idx, rn))
        if halt is None:
            excess = torch.addcmul(rn, fnorm, neg_rtol)   # rn - rtol ||fz||; <= atol: halt
            if atol_t is not None:
                excess = excess - atol_t
        else:
            stop, hstate = halt(z.detach(), fz.detach(), hstate)
            excess = torch.where(stop, minus_one, one)
        if k == 0:
            limit = torch.clamp_min(rn + fnorm, floor).mul_(DIVERGENCE_FACTOR)
        # The one host sync of an iteration: is every sample still running and improving (its
        # residual below its best so far: no copy of the best iterate is needed)? (nan fails
        # the `> 0` test, so non-finite values are caught.)
        if k == 0:
            fast = excess.min().item() > 0
        elif per_sample:
            fast = torch.minimum(best_r - rn, excess).min().item() > 0
        else:
            fast = torch.minimum(limit - rn, excess).min().item() > 0
        keep = None
        if fast:
            best_z, best_r = z, rn     # the current iterate is every sample's best: no copy
        else:
            # Slow path: something halted, diverged or got worse.
            if k == 0:   # the start is the best so far, even when its residual is nan
                if not bool(torch.isfinite(z).all()):
                    raise ValueError("z0 contains nan or inf: start from a finite point (zeros, or a previous solution).")
                best_z, best_r = z, rn
            bad = ~(rn <= limit)      # non-finite, or blown up
            conv_now = (excess <= 0) & ~bad
            if k > 0:
                # The best iterate: the smallest residual, except that the iterate at which a
                # sample meets its criterion is taken (so the status holds at sol.z).
                improved = (rn < best_r) | conv_now
                best_z = torch.where(improved.view(bcast), z, best_z)
                best_r = torch.where(improved, rn, best_r)
            if per_sample:
                done = conv_now | bad
                n_done = int(done.sum())      # (a host sync, on the slow path only)
                codes = None
                if n_done:
                    codes = torch.where(conv_now, done_code, int(Status.DIVERGED))
                if n_done == n_active:        # everyone left stops here: no copies
                    finished.append(_Finished(idx, best_z, best_r, k + 1, codes))
                    n_active = 0
                    break
                if n_done:
                    # One gather per field: the rows that stay come first (in order), the rows
                    # that stop are the tail, kept as a finished chunk.
                    order = torch.argsort(done, stable=True)
                    n_active -= n_done
                    keep = order[:n_active]
                    idx = order if idx is None else idx.index_select(0, order)
                    best_z, best_r, limit, codes = (
                        t.index_select(0, order) for t in (best_z, best_r, limit, codes))
                    finished.append(_Finished(idx[n_active:], best_z[n_active:], best_r[n_active:],
                                              k + 1, codes[n_active:]))
                    idx, best_z, best_r, limit = idx[:n_active], best_z[:n_active], best_r[:n_active], limit[:n_active]
                    xa = select_rows(xa, keep)
                    if hstate is not None:
                        hstate = compact_rows(hstate, keep)
            else:
                # halting="batch": the batch stops when, at this one iterate, every sample
                # meets its criterion or has diverged; the statuses are those at this iterate.
                dead_mask = bad if dead_mask is None else dead_mask | bad
                all_done, any_dead = torch.stack(((conv_now | dead_mask).all(), dead_mask.any())).tolist()
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
        if round_fn is not None:
            z = round_fn(z)
        k += 1

    if not per_sample:
        # One iterate of the whole batch: the last one f saw; every status holds at it.
        conv_last = (excess <= 0) & (rn <= limit)
        status = torch.where(conv_last, done_code, int(Status.MAX_ITER))
        if dead_mask is not None:
            status = torch.where(dead_mask, int(Status.DIVERGED), status)
        iterations = torch.full((B,), k + 1, dtype=torch.int64, device=dev)
        return _result(z, rn, iterations, status, evaluations, trace_rows, B, dtype)
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
    converged = (status == int(Status.CONVERGED)) | (status == int(Status.HALTED))
    return Solution(z=z, iterations=it, residual=r, converged=converged, status=status, evaluations=evaluations, trace=trace)


def _assemble(finished: List[_Finished], B: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Put the finished chunks back in the original row order, with their status codes."""
    dev = finished[0].z.device
    codes = [torch.full((c.z.shape[0],), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
             if c.status is None else c.status for c in finished]
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
