"""The one iteration loop: halting, compaction, best-iterate tracking, divergence, status, trace.

Solvers only propose the next iterate (`solvers._base.Solver`); everything a user reads in a
`Solution` is decided here, the same way for every solver.

Cost per iteration on the fast path (no sample halted, every residual fell): f, one
subtraction, two per-sample norms, three small ops and ONE host sync (`.item()`) to decide
whether anything needs attention. Only when a sample halts, diverges or fails to improve does
the slow path run (masks, copies of the best iterate, compaction of the active rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ._solution import Status
from ._tree import select_rows
from .solvers._base import Solver, compact

#: A sample whose residual exceeds this multiple of its starting scale (||f(z0)-z0|| + ||f(z0)||)
#: is DIVERGED, as is one whose residual is not finite.
DIVERGENCE_FACTOR = 1e6


@dataclass
class LoopResult:
    z: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    status: Tensor
    evaluations: int
    trace: Optional[Tensor]


def _norms(g: Tensor, fz: Tensor, dims: Tuple[int, ...], norm: str) -> Tuple[Tensor, Tensor]:
    if norm == "l2":
        return torch.linalg.vector_norm(g, dim=dims), torch.linalg.vector_norm(fz, dim=dims)
    return g.abs().amax(dim=dims), fz.abs().amax(dim=dims)


class _Finished:
    """Rows that stopped together: their original indices and results (concatenated at the end)."""

    __slots__ = ("rows", "z", "residual", "iterations", "status")

    def __init__(self, rows: Optional[Tensor], z: Tensor, residual: Tensor, iterations: int, status: Tensor) -> None:
        self.rows, self.z, self.residual, self.iterations, self.status = rows, z, residual, iterations, status


_CONSTANTS: dict = {}


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor (a Python float operand costs more per op than a cached tensor)."""
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
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
) -> LoopResult:
    """Solve z = fn(z, x) from z0 (with fz0 = fn(z0, x) already computed). Runs under no_grad."""
    B, dev, dtype = z0.shape[0], z0.device, z0.dtype
    dims = tuple(range(1, z0.ndim))
    bcast = (-1,) + (1,) * (z0.ndim - 1)
    neg_rtol = _constant(-rtol, dtype, dev)
    atol_t = _constant(atol, dtype, dev) if atol > 0 else None
    converged_code = _constant(int(Status.CONVERGED), torch.int64, dev)
    diverged_code = _constant(int(Status.DIVERGED), torch.int64, dev)

    finished: List[_Finished] = []
    conv_mask = dead_mask = None      # halting="batch" only
    any_dead = False

    idx: Optional[Tensor] = None      # original row of each active row (made at the first drop)
    z, xa, fz = z0, x, fz0
    best_z, best_r = z0, z0.new_full((1,), float("inf"))
    limit = rn0 = fn0 = None          # divergence limit, built from the first residuals when needed
    state = None
    compact_state = getattr(solver, "compact", None) or compact
    n_active, evaluations = B, 0
    trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]] = [] if record else None

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
        rn, fnorm = _norms(g, fz, dims, norm)
        if trace_rows is not None:
            trace_rows.append((idx, rn))
        excess = torch.addcmul(rn, fnorm, neg_rtol)   # rn - rtol ||fz||; <= atol: halt
        if atol_t is not None:
            excess = excess - atol_t
        if k == 0:
            rn0, fn0 = rn, fnorm
        # The one host sync of an iteration: is every residual above tolerance and below the
        # sample's best so far? (nan fails the `> 0` test, so non-finite values are caught.)
        if torch.minimum(best_r - rn, excess).min().item() > 0:
            best_z, best_r = z, rn     # the current iterate is every sample's best: no copy
        else:
            # Slow path: something halted, diverged or got worse.
            if limit is None:
                limit = (rn0 + fn0).mul_(DIVERGENCE_FACTOR)
            if k == 0:   # the start is the best so far, even when its residual is nan
                if not bool(torch.isfinite(z).all()):
                    raise ValueError("z0 contains nan or inf: start from a finite point (zeros, or a previous solution).")
                best_z, best_r = z, rn
            else:
                improved = rn < best_r
                best_z = torch.where(improved.view(bcast), z, best_z)
                best_r = torch.where(improved, rn, best_r)
            conv_now = excess <= 0
            bad = ~(rn <= limit)      # non-finite, or blown up
            if per_sample:
                done = conv_now | bad
                fin = done.nonzero().squeeze(1)
                n_done = fin.shape[0]   # (a host sync, on the slow path only)
                if n_done:
                    codes = torch.where(conv_now, converged_code, diverged_code)
                    if n_done == n_active:   # everyone left stops here: no copies
                        finished.append(_Finished(idx, best_z, best_r, k + 1, codes))
                        n_active = 0
                        break
                    if idx is None:
                        idx = torch.arange(B, device=dev)
                    pick = lambda t: t.index_select(0, fin)  # noqa: E731
                    finished.append(_Finished(pick(idx), pick(best_z), pick(best_r), k + 1, pick(codes)))
                    n_active -= n_done
                    keep = (~done).nonzero().squeeze(1)
                    take = lambda t: t.index_select(0, keep)  # noqa: E731
                    same = best_z is z
                    idx, z, fz, g, best_r, limit = map(take, (idx, z, fz, g, best_r, limit))
                    best_z = z if same else take(best_z)
                    xa = select_rows(xa, keep)
                    if state is not None:
                        state = compact_state(state, keep)
            else:
                conv_mask = conv_now if conv_mask is None else conv_mask | conv_now
                dead_mask = bad if dead_mask is None else dead_mask | bad
                all_done, any_dead = torch.stack(((conv_mask | dead_mask).all(), dead_mask.any())).tolist()
                if all_done:
                    break
        if k + 1 >= max_iter:
            break
        if state is None:
            state = solver.init(z, fz, g)
        z, state = solver.step(state, z, fz, g, k)
        if any_dead:   # halting="batch": diverged rows stay frozen at their best iterate
            z = torch.where(dead_mask.view(bcast), best_z, z)
        k += 1

    max_code = _constant(int(Status.MAX_ITER), torch.int64, dev)
    if per_sample:
        if n_active:   # budget spent: the rows still active get MAX_ITER
            finished.append(_Finished(idx, best_z, best_r, k + 1, max_code.expand(n_active)))
    else:
        status = max_code.expand(B)
        if conv_mask is not None:
            status = torch.where(conv_mask, converged_code, torch.where(dead_mask, diverged_code, status))
        finished.append(_Finished(idx, best_z, best_r, k + 1, status))
    out_z, out_r, out_it, out_status = _assemble(finished, B)

    trace = None
    if trace_rows is not None:
        trace = torch.full((len(trace_rows), B), float("nan"), dtype=dtype, device=dev)
        for t, (ix, r) in enumerate(trace_rows):
            if ix is None:
                trace[t] = r
            else:
                trace[t].index_copy_(0, ix, r)
    return LoopResult(
        z=out_z,
        iterations=out_it,
        residual=out_r,
        converged=out_status == converged_code,
        status=out_status,
        evaluations=evaluations,
        trace=trace,
    )


def _assemble(finished: List[_Finished], B: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Put the finished chunks back in the original row order."""
    dev = finished[0].z.device
    its = [torch.full((c.z.shape[0],), c.iterations, dtype=torch.int64, device=dev) for c in finished]
    if len(finished) == 1:   # everyone stopped together and no row was ever dropped
        c = finished[0]
        return c.z, c.residual, its[0], c.status.contiguous()
    rows = torch.cat([c.rows for c in finished])   # every chunk has rows once one was dropped
    order = torch.empty_like(rows)
    order[rows] = torch.arange(B, device=dev)
    pick = lambda parts: torch.cat(parts).index_select(0, order)  # noqa: E731
    return (pick([c.z for c in finished]), pick([c.residual for c in finished]),
            pick(its), pick([c.status for c in finished]))
