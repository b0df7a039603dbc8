"""The iteration loop: one `Run` (a solve as the loop sees it), the batch loop, and what both
loops share (a pass's measurement, f's later calls, the trace, the kept path).

Solvers only propose the next iterate (`solvers._base.Solver`); everything a user reads in a
`Solution` is decided by the loops, with the rules of `_rules`, the same way for every solver.

halting="sample": `_sample_loop.SampleLoop` (stopped rows leave f's batch at host looks);
`_run.Run` picks the loop.
halting="batch" (`iterate_batch`): one sync per pass; the batch stops at the first iterate
where every sample meets its criterion or has diverged, and returns that iterate.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ._criteria import PackedCriterion, Residual
from ._rules import (check_step, check_untouched, constant, done_code, floor, limit as divergence_limit, solution,
                     version)
from ._solution import Solution, Status

Map = Callable[[Tensor, Any], Tensor]
Trace = List[Tuple[Optional[Tensor], Tensor]]      # per pass: (original rows or None, residuals)
Kept = List[Tuple[int, Optional[Tensor], Tensor]]  # (pass, original rows or None, iterates)


# --- what both loops share -----------------------------------------------------------------

def call_f(fn: Map, z: Tensor, xa: Any, k: int, n_active: int, B: int) -> Tensor:
    """One evaluation of f after the first; f's own exceptions reach the caller unchanged."""
    before = version(z)
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
    hint = ("" if n_active == B else " With halting='sample' f receives only the rows still "
            "active, so it must treat samples independently; use halting='batch' if it mixes them.")
    check_untouched((before,), (z,))
    return check_step(fz, z, f"at iteration {k + 1}", hint)


def check_start(z0: Tensor) -> None:
    """A clear error for a non-finite start (called only when the first pass is not clean:
    a finite residual at z0 already shows that z0 is finite)."""
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains nan or inf: start from a finite point (zeros, or a previous solution).")


def measurer(rule: Residual, criterion: Optional[PackedCriterion], z0: Tensor) -> Callable[..., Tuple[Any, ...]]:
    """measure(z, fz, cstate) -> (g, ||g||, ||f(z)||, excess, cstate) for one pass: excess <= 0
    where the sample's criterion holds (the residual rule's margin, or -1/+1 from `criterion`).
    Under Unroll (grad mode) the decisions use detached norms."""
    one, minus_one = constant(1.0, z0.dtype, z0.device), constant(-1.0, z0.dtype, z0.device)
    recording = torch.is_grad_enabled()

    def measure(z: Tensor, fz: Tensor, cstate: Any) -> Tuple[Any, ...]:
        g = fz - z
        rn, fnorm = rule.norms(g.detach(), fz.detach()) if recording else rule.norms(g, fz)
        if criterion is None:
            excess = rule.excess(rn, fnorm)
        else:
            stop, cstate = criterion(z.detach(), fz.detach(), cstate)
            excess = torch.where(stop, minus_one, one)
        return g, rn, fnorm, excess, cstate

    return measure


def make_trace(trace_rows: Optional[Trace], it: Tensor, B: int, dtype: torch.dtype) -> Optional[Tensor]:
    """The residual history [T, B] (nan once a sample has halted), or None."""
    if trace_rows is None:
        return None
    dev = it.device
    trace = torch.full((len(trace_rows), B), float("nan"), dtype=dtype, device=dev)
    for t, (ix, rr) in enumerate(trace_rows):
        if ix is None:
            trace[t] = rr
        else:
            trace[t].index_copy_(0, ix, rr)
    # (passes that ran between a sample's stop and the next look are not its history)
    T = int(it.max())
    return trace[:T].masked_fill(torch.arange(T, device=dev)[:, None] >= it[None, :], float("nan"))


def kept_path(passes: Tuple[int, ...], kept: Kept, z: Tensor, it: Tensor, fewest: int) -> List[Tensor]:
    """Per pass p of `passes`, every sample's iterate at pass p, [B, ...] in the loop's layout.

    A sample that stopped before pass p (it < p) gives its returned iterate `z` instead. The
    iterates are the loop's own tensors (references): a copy is made only for a pass that some
    sample did not reach (`fewest`: the fewest passes any sample received) or after rows left f.
    """
    at = {p: (rows, zp) for p, rows, zp in kept}
    path = []
    for p in passes:
        if p not in at:                   # (the loop stopped before pass p)
            path.append(z)
            continue
        rows, zp = at[p]
        full = zp if rows is None else z.index_copy(0, rows, zp)
        if p > fewest:
            full = torch.where((it >= p).view((-1,) + (1,) * (z.ndim - 1)), full, z)
        path.append(full)
    return path


# --- halting="batch" -------------------------------------------------------------------------

def iterate_batch(s: dict) -> Solution:
    """Every sample receives every pass (f may mix them). The batch stops when, at one
    iterate, every sample meets its criterion or has diverged, and returns that iterate: the
    statuses are those at it. A diverged row is frozen at its last finite iterate (safe_z)
    so it cannot poison a map that mixes rows."""
    fn, z0, x, solver, rule, criterion = s["fn"], s["z0"], s["x"], s["solver"], s["rule"], s["criterion"]
    max_iter, round_fn, passes, min_iter = s["max_iter"], s["round_fn"], s["path_passes"], s["min_iter"]
    B, dev = z0.shape[0], z0.device
    bcast = (-1,) + (1,) * (z0.ndim - 1)
    measure = measurer(rule, criterion, z0)
    low = floor(z0[0].numel(), rule.norm)
    dead_mask: Optional[Tensor] = s.get("frozen")
    any_dead = dead_mask is not None
    z, fz = z0, s["fz0"]
    safe_z = safe_r = limit = None
    if any_dead:   # (rows known dead: held at their start, DIVERGED, from the first pass)
        dead_mask, safe_z, safe_r = dead_mask.clone(), z0, torch.zeros(B, dtype=z0.dtype, device=dev)
        bad = torch.zeros(B, dtype=torch.bool, device=dev)
    state = None
    cstate = criterion.init(z0) if criterion is not None else None
    evaluations = 0
    trace_rows: Optional[Trace] = [] if s["record"] else None
    kept: Kept = []
    k = 0
    while True:
        if k > 0:
            fz = call_f(fn, z, x, k, B, B)
        evaluations += B
        if k + 1 in passes:
            kept.append((k + 1, None, z))
        g, rn, fnorm, excess, cstate = measure(z, fz, cstate)
        if trace_rows is not None:
            trace_rows.append((None, rn))
        if limit is None:
            limit = divergence_limit(rn, fnorm, low)
        # The one host sync of a pass: is every sample still running and within bounds?
        # (nan fails the `> 0` test, so non-finite values are caught.) Before min_iter no
        # criterion may stop a sample.
        early = k + 1 < min_iter
        if (limit - rn if early else torch.minimum(limit - rn, excess)).min().item() > 0:
            safe_z, safe_r = z, rn
        else:
            if k == 0:
                check_start(z0)
            bad = ~(rn <= limit)      # non-finite, or blown up
            safe_z = z if safe_z is None else torch.where(bad.view(bcast), safe_z, z)
            safe_r = rn if safe_r is None else torch.where(bad, safe_r, rn)
            dead_mask = bad if dead_mask is None else dead_mask | bad
            met = dead_mask if early else (excess <= 0) | dead_mask
            all_done, any_dead = torch.stack((met.all(), dead_mask.any())).tolist()
            if all_done:
                break
        if k + 1 >= max_iter:
            break
        if state is None:
            state = solver.init(z, fz, g)
        z, state = solver.step(state, z, fz, g, k)
        if any_dead:
            z = torch.where(dead_mask.view(bcast), safe_z, z)
        if round_fn is not None:
            z = round_fn(z)
        k += 1

    held = (excess <= 0) & (rn <= limit)
    status = torch.where(held, done_code(criterion), int(Status.MAX_ITER))
    if criterion is not None and bool((held if dead_mask is None else held | dead_mask).all()):
        # (a criterion judged the newest state, f(z): when every sample halted there, the batch
        # returns it; when the budget ran out first, the batch stays at its last iterate z, a
        # point where f was evaluated, so that every status holds at one iterate of the batch)
        z = fz
    if dead_mask is not None:
        status = torch.where(dead_mask, int(Status.DIVERGED), status)
        # (a row that died at this pass goes back to its last finite iterate and its residual)
        z = torch.where(dead_mask.view(bcast), safe_z, z)
        rn = torch.where(dead_mask & bad, safe_r, rn)
    iterations = torch.full((B,), k + 1, dtype=torch.int64, device=dev)
    sol = solution(z, rn, iterations, status, evaluations, make_trace(trace_rows, iterations, B, z0.dtype))
    if passes:
        sol.path = kept_path(passes, kept, sol.z, sol.iterations, k + 1)
    return sol


__all__ = ["iterate_batch", "call_f", "measurer", "check_start",
           "make_trace", "kept_path"]
