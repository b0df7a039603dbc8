"""halting="sample": every sample stops at its own pass; stopped rows leave f's batch.

The host looks every `check_every` passes, or, by default, when it predicts that the first
of the active samples will stop (`next_window`). Between two looks a pass is f, one subtraction
and two norms: the iterates and norms of the window are kept (references, no copies). At
the look the window's norms go to the host (one sync), where each sample's first pass that
met its criterion (or diverged, or spent the budget) is found (`_rules.first_stops`), so
iteration counts and returned iterates are exact; a sample that stopped inside the window
only cost the rows of the passes after it. On the device a look gathers the answers of the
rows that stop (one gather per pass that holds them; nothing is copied while every residual
keeps falling) and drops those rows from f, x and the solver state (one gather per field).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._criteria import PackedCriterion, Residual
from ._loop import Kept, Map, Trace, call_f, check_start, kept_path, make_trace, measurer
from ._rules import (Finished, assemble, done_code, first_stops, floor, host_arrays, index_tensor, limit as divergence_limit,
                     solution, window_answers)
from ._solution import Solution
from ._tree import select_rows
from .solvers._base import Solver, compact
from .solvers.fixed_point import FixedPointIteration


class SampleLoop:
    """One per-sample solve: the pass loop (`run`) and the host's look (`look`)."""

    def __init__(self, fn: Map, z0: Tensor, x: Any, fz0: Tensor, solver: Solver, rule: Residual, max_iter: int,
                 per_sample: bool, criterion: Optional[PackedCriterion], record: bool, check_every: Optional[int],
                 round_fn: Optional[Callable[[Tensor], Tensor]], path_passes: Tuple[int, ...],
                 min_iter: int = 1, frozen: Optional[Tensor] = None) -> None:
        self.fn, self.z0, self.x, self.fz0, self.solver, self.rule = fn, z0, x, fz0, solver, rule
        self.max_iter, self.criterion, self.check_every, self.round_fn = max_iter, criterion, check_every, round_fn
        self.passes, self.min_iter = path_passes, min_iter
        self.window = 1 if check_every is None else check_every   # passes until the next look
        self.recent: Optional[np.ndarray] = None   # each active row's last RECENT residuals
        # the fastest decay per pass assumed before a row's own rate is known
        plain = isinstance(solver, FixedPointIteration)
        self.fastest = FASTEST_PLAIN if plain else FASTEST_ACCELERATED
        self.safety = SAFETY if plain else SAFETY_ACCELERATED
        self.newest = criterion is not None   # (a criterion's halted rows return f's newest output)
        self.B, self.dev = z0.shape[0], z0.device
        self.done_code = done_code(criterion)
        self.rows_on_device = record or bool(path_passes)   # (the trace and sol.path index by original row)
        self.trace_rows: Optional[Trace] = [] if record else None
        self.finished: List[Finished] = []
        self.idx: Optional[np.ndarray] = None       # original row of each active row (None: all, in order)
        self.idx_t: Optional[Tensor] = None         # the same on the device, when the trace or path needs it
        self.best_z: Optional[Tensor] = None        # holds each active row's best iterate before the window,
        self.best_row: Optional[np.ndarray] = None  # at these rows (None: row i of active row i)
        self.best_r: Optional[np.ndarray] = None    # (None: no look yet)
        self.limit: Optional[np.ndarray] = None     # each active row's divergence limit (host)
        self.n_active = self.B
        self.xa = x                                 # the active rows' inputs
        self.cstate: Any = None                     # the criterion's state of the active rows

    def run(self) -> Solution:
        """Pass after pass until every row has stopped; then the Solution in the original order."""
        self.start()
        while not self.stopped:
            self.advance()
        return self.finish()

    #: the fields that carry the loop from one pass to the next (what a checkpointed segment
    #: of `Unroll(checkpoint=c)` starts from); `finished`, `trace_rows` and `kept` are outputs
    CARRY = ("z", "fz", "state", "limit_t", "win_z", "win_r", "win_e", "win_f", "best_z", "idx_t", "xa", "cstate")

    def answer_only(self) -> Tuple[str, ...]:
        """The CARRY fields whose values reach only the answers (rows gathered, never f, the
        solver or a tensor autograd saves): each row's best iterate so far."""
        return ("best_z",)

    def decisions(self) -> Tuple[int, ...]:
        """The host's decisions so far, in brief: passes, active rows (their count and the sum
        of their original indices), whether every row has stopped."""
        return self.k, self.n_active, -1 if self.idx is None else int(self.idx.sum()), int(self.stopped)

    def start(self) -> None:
        """The state before the first pass (f(z0) is known: `fz0`)."""
        self.measure = measurer(self.rule, self.criterion, self.z0)
        self.select_state = getattr(self.solver, "compact", None) or compact
        self.cstate = self.criterion.init(self.z0) if self.criterion is not None else None
        self.z, self.fz = self.z0, self.fz0
        self.limit_t: Optional[Tensor] = None
        self.state: Any = None
        self.evaluations = 0
        self.kept: Kept = []
        self.win_z: List[Tensor] = []   # the window's iterates (references), their residual norms and
        self.win_r: List[Tensor] = []   # excess over the tolerance (<= 0: met; or -1/+1 from a criterion)
        self.win_e: List[Tensor] = []
        self.win_f: List[Tensor] = []   # f's outputs (the newest states), with a criterion
        self.k = 0
        self.stopped = False

    def advance(self) -> None:
        """One pass: f (after the first), the measurement, a look when due, the solver's step."""
        solver, k = self.solver, self.k
        z, fz = self.z, self.fz
        if k > 0:
            fz = call_f(self.fn, z, self.xa, k, self.n_active, self.B)
        self.evaluations += self.n_active
        if k + 1 in self.passes:
            self.kept.append((k + 1, self.idx_t, z))
        g, rn, fnorm, excess, self.cstate = self.measure(z, fz, self.cstate)
        if self.trace_rows is not None:
            self.trace_rows.append((self.idx_t, rn))
        if self.limit_t is None:
            self.limit_t = divergence_limit(rn, fnorm, floor(self.z0[0].numel(), self.rule.norm))
        self.win_z.append(z)
        self.win_r.append(rn)
        self.win_e.append(excess)
        if self.newest:
            self.win_f.append(fz)
        last = k + 1 >= self.max_iter
        stay = None
        if len(self.win_z) == self.window or last or k == 0:   # (a look after the first pass
            # catches a warm start that is already a fixed point)
            stay = self.look(self.win_z, self.win_r, self.win_e, self.win_f, self.limit_t, k, last)
            self.win_z, self.win_r, self.win_e, self.win_f = [], [], [], []
            if self.n_active == 0:
                self.stopped = True
                return
        # The solver steps on the rows it has seen, then the rows that stopped are dropped
        # from its output (so f(z) and g are never copied).
        if self.state is None:
            self.state = solver.init(z, fz, g)
        z, self.state = solver.step(self.state, z, fz, g, k)
        if stay is not None:
            z = z.index_select(0, stay)
            self.state = self.select_state(self.state, stay)
        if self.round_fn is not None:
            z = self.round_fn(z)
        self.z, self.fz, self.k = z, None, k + 1   # (f(z) is known only for z0)

    def finish(self) -> Solution:
        """The Solution, in the original order of the rows."""
        z, r, it, status = assemble(self.finished, self.dev)
        sol = solution(z, r, it, status, self.evaluations, make_trace(self.trace_rows, it, self.B, self.z0.dtype))
        if self.passes:
            sol.path = kept_path(self.passes, self.kept, sol.z, sol.iterations, int(sol.iterations.min()))
        return sol

    def look(self, win_z: List[Tensor], win_r: List[Tensor], win_e: List[Tensor], win_f: List[Tensor],
             limit_t: Tensor, k: int, last: bool) -> Optional[Tensor]:
        """The host's look at a window: record the rows that stopped, keep each other row's best
        iterate, and return the rows that stay (None: all of them)."""
        w = len(win_z)
        if self.limit is None:
            R, E, self.limit = host_arrays(_stacked(win_r), _stacked(win_e), limit_t)
            if not np.isfinite(R[0]).all():
                check_start(self.z0)
        else:
            R, E = host_arrays(_stacked(win_r), _stacked(win_e))
        met = E <= 0
        if k + 1 - (w - 1) < self.min_iter:   # (no stop by the criterion before min_iter evaluations)
            met &= (k + 1 - (w - 1) + np.arange(w) >= self.min_iter)[:, None]
        if not last and not met.any() and (R <= self.limit).all():   # (nothing stops: no search)
            first, codes = np.full(self.n_active, w), np.full(self.n_active, -1)
            calm = True
        else:
            first, codes = first_stops(R, met, self.limit, w - 1 if last else w, self.done_code)
            calm = bool((codes < 0).all())
        best_r = self.best_r
        if calm and (best_r is None or (R[-1] < best_r).all()) and (w == 1 or (R[1:] < R[:-1]).all()):
            # quiet: nothing stopped and every residual fell at every pass, so the last
            # iterate is every row's best (no gather, no copy)
            self.best_z, self.best_row, self.best_r = win_z[-1], None, R[-1]
            self.plan(R, E, None, k)
            return None
        n, cols, best_row = self.n_active, np.arange(self.n_active), self.best_row
        its = k + 1 - (w - 1) + np.minimum(first, w - 1)   # evaluations at the stop pass
        # each row's answer: the pass where its criterion held, else its best up to its stop,
        # if that beats its best before the window
        sel, better = window_answers(R, first, codes == self.done_code, best_r)
        out_r = R[sel, cols] if best_r is None else np.where(better, R[sel, cols], best_r)
        # Where each row's answer lives: row i of the window's pass src[i], or (src == w) row
        # best_row[i] of best_z. Rows are gathered only when they leave, or when the rows that
        # stay no longer share one source (a falling residual is never copied).
        src = np.where(better, sel, w)
        sources = win_z + [self.best_z] + win_f
        if self.newest:   # (a halted row's answer is f's output at its stop: source w + 1 + pass)
            src = np.where(codes == self.done_code, w + 1 + sel, src)
        rows_in = lambda r: r if best_row is None else np.where(src[r] == w, best_row[r], r)  # noqa: E731
        done = codes >= 0
        gone = np.flatnonzero(done)
        for part in _by_source(src, gone):
            p = int(src[part[0]])
            whole = part.size == n and (p != w or best_row is None or
                                        (best_row.size == self.best_z.shape[0] and (best_row == cols).all()))
            zp = sources[p] if whole else sources[p].index_select(0, index_tensor(rows_in(part), self.dev))
            self.finished.append(Finished(self.idx if whole else (part if self.idx is None else self.idx[part]), zp,
                                          out_r[part], its[part], codes[part]))
        if gone.size == n:
            self.n_active = 0
            return None
        stay_rows = np.flatnonzero(~done) if gone.size else cols
        parts = _by_source(src, stay_rows)
        if len(parts) == 1:                 # (one source: keep it, with a row map)
            p = int(src[stay_rows[0]])
            self.best_row = rows_in(stay_rows) if p == w else stay_rows
            self.best_z = sources[p]
        else:
            self.best_z = torch.cat([sources[int(src[q[0]])].index_select(0, index_tensor(rows_in(q), self.dev))
                                     for q in parts])
            self.best_row = np.empty(stay_rows.size, dtype=np.int64)
            self.best_row[np.searchsorted(stay_rows, np.concatenate(parts))] = np.arange(stay_rows.size)
        self.best_r = out_r[stay_rows]
        self.plan(R, E, stay_rows if gone.size else None, k)
        if not gone.size:
            return None
        stay = index_tensor(stay_rows, self.dev)
        self.n_active = stay_rows.size
        self.idx = stay_rows if self.idx is None else self.idx[stay_rows]
        if self.rows_on_device:
            self.idx_t = index_tensor(self.idx, self.dev)
        self.limit = self.limit[stay_rows]
        self.xa = select_rows(self.xa, stay)
        if self.cstate is not None:
            self.cstate = self.criterion.select(self.cstate, stay)
        return stay


    def plan(self, R: np.ndarray, E: np.ndarray, rows: Optional[np.ndarray], k: int) -> None:
        """Choose the passes until the next look (unless the user fixed `check_every`).

        The batch's last look must come when its slowest row stops, else f is called for
        nothing: each row's decay rate (its last two residuals) predicts the passes until its
        residual meets its tolerance, and the window shrinks from DEFAULT_WINDOW to 1 as the
        slowest prediction nears (half of it, so a row that speeds up is still caught).
        `Depth(K)` stops every row at K: the look is placed there. A read-out criterion gives
        no prediction: a look every pass. Counts and answers are exact whatever the window;
        only the passes that a stopped row waits change."""
        r = R[-1] if rows is None else R[-1][rows]
        if self.check_every is not None:
            return
        k1 = k + 1
        if self.criterion is not None:
            depth = self.criterion.depth()
            self.window = 1 if depth is None else max(1, depth - k1)
            return
        if not self.safety:   # (an accelerated solver: only the fastest plausible fall bounds it)
            thr = r - (E[-1] if rows is None else E[-1][rows])
            fine = (thr > 0) & (r > thr) & np.isfinite(r)
            if not fine.all():
                self.window = max(1, self.min_iter - k1) if (r > thr).any() else DEFAULT_WINDOW
                return
            far = (r / thr).max()
            window = 0 if far <= NEAR else int(min(DEFAULT_WINDOW, np.log(far) / -np.log(self.fastest)))
            self.window = max(window, self.min_iter - k1, 1)
            return
        # each row's fastest fall per pass among its last passes (a residual that falls unevenly,
        # e.g. under a rotation, must not be predicted by its slower passes: that would look late)
        seq = R if self.recent is None else np.concatenate((self.recent, R))[-RECENT:]   # the last residuals
        fastest = None
        if seq.shape[0] > 1:
            ratio = seq[1:] / np.where(seq[:-1] > 0, seq[:-1], np.inf)
            fastest = np.where(ratio > 0, ratio, np.inf).min(0)
            if rows is not None:
                fastest = fastest[rows]
        self.recent = seq if rows is None else seq[:, rows]
        thr = r - (E[-1] if rows is None else E[-1][rows])        # each row's tolerance
        # (rows with a zero or non-finite tolerance or residual are told apart before dividing,
        # so no division by zero warns)
        fine = (thr > 0) & (r > thr) & np.isfinite(r)
        far = np.where(fine, r, 2.0) / np.where(fine, thr, 1.0)      # how far above its tolerance
        # Passes until each row meets its tolerance: at its fastest fall so far, and at most as
        # fast as `self.fastest` per pass.
        if fastest is None:
            ok = np.zeros_like(fine)
            rho = far
        else:
            ok = fine & (fastest > 0) & (fastest < 1)
            rho = np.where(ok, fastest, 0.5)
        # Each row's predicted passes: none for a row within CLOSE of its tolerance (rounding can
        # stop it any pass) or near it while its residual does not fall; else at most as fast as
        # `self.fastest` a pass, and for a falling row at its fastest recent fall (discounted by
        # `self.safety`). The slowest row's prediction sets the window: only its stop must be
        # caught at once (a faster row that waits costs rows, not calls).
        passes = np.log(far) / -np.log(self.fastest)
        if ok.any() and self.safety:
            passes[ok] = np.maximum(passes[ok], np.log(far[ok]) / -np.log(rho[ok]) * self.safety)
        passes[(far <= CLOSE) | (~ok & (far <= NEAR))] = 0.0
        passes[~fine & (r > thr)] = 0.0   # (a tolerance of 0 or a non-finite residual: no prediction)
        passes[~fine & ~(r > thr)] = np.inf
        window = DEFAULT_WINDOW if passes.size == 0 else int(min(DEFAULT_WINDOW, passes.max()))
        self.window = max(window, self.min_iter - k1, 1)


#: the window while no row is predicted to stop within twice as many passes
DEFAULT_WINDOW = 4
#: the fraction of the slowest row's predicted passes (at its measured linear rate) that the next
#: window may take: plain iteration; an accelerated solver's rate can improve at any pass (a secant
#: step lands), so only the fastest decay bounds its passes
SAFETY = 0.75
SAFETY_ACCELERATED = 0.0
#: the fastest decay per pass assumed for a row: plain iteration (its contraction factor), and an
#: accelerated solver (which can beat its own history: exact in a few steps on a small linear map)
FASTEST_PLAIN = 0.01
FASTEST_ACCELERATED = 1e-3
#: a row whose residual did not fall, within this factor of its tolerance, gets a look every pass
NEAR = 16.0
#: any row within this factor of its tolerance gets a look every pass
CLOSE = 2.0
#: the residuals per row whose fastest fall predicts its passes
RECENT = 6


def _stacked(ts: List[Tensor]) -> Tensor:
    """The window's [b] tensors as one [w, b] tensor (a view when w = 1: no op)."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def _by_source(src: np.ndarray, rows: np.ndarray) -> List[np.ndarray]:
    """`rows` grouped by their value in `src` (ascending rows within a group)."""
    if rows.size == 0:
        return []
    s = src[rows]
    if (s == s[0]).all():
        return [rows]
    return [rows[s == v] for v in np.flatnonzero(np.bincount(s))]


__all__ = ["SampleLoop"]
