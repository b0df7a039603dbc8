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
    B, dev = z0.shape[0], z0.device
    dims = tuple(range(1, z0.ndim))
    bcast = (-1,) + (1,) * (z0.ndim - 1)
    rtol_t = torch.tensor(rtol, dtype=z0.dtype, device=dev)
    atol_t = torch.tensor(atol, dtype=z0.dtype, device=dev) if atol > 0 else None

    out_z = torch.empty_like(z0)
    out_r = torch.empty(B, dtype=z0.dtype, device=dev)
    out_it = torch.full((B,), max_iter, dtype=torch.int64, device=dev)
    out_status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
    converged_code = torch.tensor(int(Status.CONVERGED), dtype=torch.int64, device=dev)
    diverged_code = torch.tensor(int(Status.DIVERGED), dtype=torch.int64, device=dev)
    conv_mask = torch.zeros(B, dtype=torch.bool, device=dev)   # halting="batch" only
    dead_mask = torch.zeros(B, dtype=torch.bool, device=dev)   # halting="batch" only
    any_dead = False

    idx = torch.arange(B, device=dev)          # original row of each active row
    z, xa, fz = z0, x, fz0
    best_z, best_r, scale0 = z0, None, None
    state = None
    n_active, evaluations = B, 0
    trace_rows: Optional[List[Tuple[Tensor, Tensor]]] = [] if record else None

    k = 0
    while True:
        if k > 0:
            fz = fn(z, xa)
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
        tol = torch.mul(fnorm, rtol_t) if atol_t is None else torch.addcmul(atol_t, fnorm, rtol_t)
        excess = rn - tol          # <= 0: the halting criterion holds

        fast = False
        if k > 0:
            # The one host sync of an iteration: is every residual above tolerance and lower
            # than the sample's best so far? (nan fails the `> 0` test, so it is caught too.)
            fast = torch.minimum(best_r - rn, excess).min().item() > 0
        if fast:
            best_z, best_r = z, rn     # the current iterate is every sample's best: no copy
        else:
            finite = torch.isfinite(rn)
            if k == 0:
                best_z, best_r = z, rn
                scale0 = rn + fnorm
            else:
                improved = rn < best_r
                best_z = torch.where(improved.view(bcast), z, best_z)
                best_r = torch.where(improved, rn, best_r)
            conv_now = (excess <= 0) & finite
            div_now = ~conv_now & (~finite | (rn > DIVERGENCE_FACTOR * scale0))
            if per_sample:
                done = conv_now | div_now
                n_done = int(done.sum())
                if n_done:
                    fin = done.nonzero().squeeze(1)
                    rows = idx.index_select(0, fin)
                    out_z.index_copy_(0, rows, best_z.index_select(0, fin))
                    out_r.index_copy_(0, rows, best_r.index_select(0, fin))
                    out_it.index_fill_(0, rows, k + 1)
                    codes = torch.where(conv_now.index_select(0, fin), converged_code, diverged_code)
                    out_status.index_copy_(0, rows, codes)
                    n_active -= n_done
                    if n_active == 0:
                        break
                    keep = (~done).nonzero().squeeze(1)
                    idx = idx.index_select(0, keep)
                    z, fz, g = (t.index_select(0, keep) for t in (z, fz, g))
                    best_z, best_r, scale0 = (t.index_select(0, keep) for t in (best_z, best_r, scale0))
                    xa = select_rows(xa, keep)
                    if state is not None:
                        state = compact(state, keep)
            else:
                conv_mask |= conv_now
                dead_mask |= div_now
                flags = torch.stack(((conv_mask | dead_mask).all(), dead_mask.any())).tolist()
                any_dead = flags[1]
                if flags[0]:
                    break
        if k + 1 >= max_iter:
            break
        if state is None:
            state = solver.init(z, fz, g)
        z, state = solver.step(state, z, fz, g, k)
        if any_dead:   # halting="batch": diverged rows stay frozen at their best iterate
            z = torch.where(dead_mask.view(bcast), best_z, z)
        k += 1

    if per_sample:
        if n_active:   # budget spent: the rows still active keep status MAX_ITER
            out_z.index_copy_(0, idx, best_z)
            out_r.index_copy_(0, idx, best_r)
    else:
        out_z, out_r = best_z, best_r
        out_it.fill_(k + 1)
        out_status = torch.where(
            conv_mask, converged_code, torch.where(dead_mask, diverged_code, out_status)
        )

    trace = None
    if trace_rows is not None:
        trace = torch.full((len(trace_rows), B), float("nan"), dtype=z0.dtype, device=dev)
        for t, (ix, r) in enumerate(trace_rows):
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
