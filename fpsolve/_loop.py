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
    return BatchLoop(s).run()


class BatchLoop:
    """One halting="batch" solve (`iterate_batch`), pass by pass: `start`, `advance` until
    `stopped`, `finish` (the same interface as `_sample_loop.SampleLoop`)."""

    #: the fields that carry the loop from one pass to the next (what a checkpointed segment
    #: of `Unroll(checkpoint=c)` starts from); `trace_rows` and `kept` are outputs
    CARRY = ("z", "fz", "state", "safe_z", "safe_r", "limit", "dead_mask", "bad", "cstate", "excess", "rn")

    def __init__(self, s: dict) -> None:
        self.fn, self.z0, self.x, self.solver, self.rule = s["fn"], s["z0"], s["x"], s["solver"], s["rule"]
        self.criterion, self.max_iter, self.round_fn = s["criterion"], s["max_iter"], s["round_fn"]
        self.passes, self.min_iter, self.fz0, self.record = s["path_passes"], s["min_iter"], s["fz0"], s["record"]
        self.frozen: Optional[Tensor] = s.get("frozen")

    def answer_only(self) -> Tuple[str, ...]:
        """The CARRY fields whose values reach only the answers (never f, the solver or a tensor
        autograd saves): the last finite iterate, until a row is frozen at it."""
        return () if self.any_dead else ("safe_z",)

    def decisions(self) -> Tuple[int, ...]:
        """The host's decisions so far, in brief: passes, whether a row is frozen, whether the
        batch has stopped."""
        return self.k, int(bool(self.any_dead)), int(self.stopped)

    def run(self) -> Solution:
        """Pass after pass until the batch stops; then its Solution."""
        self.start()
        while not self.stopped:
            self.advance()
        return self.finish()

    def start(self) -> None:
        """The state before the first pass (f(z0) is known: `fz0`)."""
        z0 = self.z0
        self.B, self.bcast = z0.shape[0], (-1,) + (1,) * (z0.ndim - 1)
        self.measure = measurer(self.rule, self.criterion, z0)
        self.low = floor(z0[0].numel(), self.rule.norm)
        self.dead_mask: Optional[Tensor] = self.frozen
        self.any_dead = self.dead_mask is not None
        self.z, self.fz = z0, self.fz0
        self.safe_z = self.safe_r = self.limit = self.bad = self.rn = self.excess = None
        if self.any_dead:   # (rows known dead: held at their start, DIVERGED, from the first pass)
            self.dead_mask, self.safe_z = self.dead_mask.clone(), z0
            self.safe_r = torch.zeros(self.B, dtype=z0.dtype, device=z0.device)
            self.bad = torch.zeros(self.B, dtype=torch.bool, device=z0.device)
        self.state: Any = None
        self.cstate = self.criterion.init(z0) if self.criterion is not None else None
        self.evaluations = 0
        self.trace_rows: Optional[Trace] = [] if self.record else None
        self.kept: Kept = []
        self.k = 0
        self.stopped = False

    def advance(self) -> None:
        """One pass: f (after the first), the measurement and the one host sync, the solver's step."""
        k, B, bcast, z, fz = self.k, self.B, self.bcast, self.z, self.fz
        if k > 0:
            fz = call_f(self.fn, z, self.x, k, B, B)
        self.evaluations += B
        if k + 1 in self.passes:
            self.kept.append((k + 1, None, z))
        g, rn, fnorm, excess, self.cstate = self.measure(z, fz, self.cstate)
        self.fz, self.rn, self.excess = fz, rn, excess
        if self.trace_rows is not None:
            self.trace_rows.append((None, rn))
        if self.limit is None:
            self.limit = divergence_limit(rn, fnorm, self.low)
        limit = self.limit
        # The one host sync of a pass: is every sample still running and within bounds?
        # (nan fails the `> 0` test, so non-finite values are caught.) Before min_iter no
        # criterion may stop a sample.
        early = k + 1 < self.min_iter
        if (limit - rn if early else torch.minimum(limit - rn, excess)).min().item() > 0:
            self.safe_z, self.safe_r = z, rn
        else:
            if k == 0:
                check_start(self.z0)
            bad = self.bad = ~(rn <= limit)      # non-finite, or blown up
            self.safe_z = z if self.safe_z is None else torch.where(bad.view(bcast), self.safe_z, z)
            self.safe_r = rn if self.safe_r is None else torch.where(bad, self.safe_r, rn)
            self.dead_mask = bad if self.dead_mask is None else self.dead_mask | bad
            met = self.dead_mask if early else (excess <= 0) | self.dead_mask
            all_done, self.any_dead = torch.stack((met.all(), self.dead_mask.any())).tolist()
            if all_done:
                self.stopped = True
                return
        if k + 1 >= self.max_iter:
            self.stopped = True
            return
        if self.state is None:
            self.state = self.solver.init(z, fz, g)
        z, self.state = self.solver.step(self.state, z, fz, g, k)
        if self.any_dead:
            z = torch.where(self.dead_mask.view(bcast), self.safe_z, z)
        if self.round_fn is not None:
            z = self.round_fn(z)
        self.z, self.fz, self.k = z, None, k + 1   # (f(z) is known only for z0)

    def finish(self) -> Solution:
        """The Solution at the iterate where the batch stopped."""
        z, fz, rn, excess, dead_mask, criterion = self.z, self.fz, self.rn, self.excess, self.dead_mask, self.criterion
        held = (excess <= 0) & (rn <= self.limit)
        status = torch.where(held, done_code(criterion), int(Status.MAX_ITER))
        if criterion is not None and bool((held if dead_mask is None else held | dead_mask).all()):
            # (a criterion judged the newest state, f(z): when every sample halted there, the batch
            # returns it; when the budget ran out first, the batch stays at its last iterate z, a
            # point where f was evaluated, so that every status holds at one iterate of the batch)
            z = fz
        if dead_mask is not None:
            status = torch.where(dead_mask, int(Status.DIVERGED), status)
            # (a row that died at this pass goes back to its last finite iterate and its residual)
            z = torch.where(dead_mask.view(self.bcast), self.safe_z, z)
            rn = torch.where(dead_mask & self.bad, self.safe_r, rn)
        iterations = torch.full((self.B,), self.k + 1, dtype=torch.int64, device=self.z0.device)
        sol = solution(z, rn, iterations, status, self.evaluations,
                       make_trace(self.trace_rows, iterations, self.B, self.z0.dtype))
        if self.passes:
            sol.path = kept_path(self.passes, self.kept, sol.z, sol.iterations, self.k + 1)
        return sol


__all__ = ["iterate_batch", "BatchLoop", "call_f", "measurer", "check_start",
           "make_trace", "kept_path"]
