"""The iteration loop: halting, compaction, best-iterate tracking, divergence, status, trace.

Solvers only propose the next iterate (`solvers._base.Solver`); everything a user reads in a
`Solution` is decided here, the same way for every solver.

halting="sample" (`_iterate_sample`): a pass is f, one subtraction and two per-sample norms
(plus the criterion); the host looks once every `check_every` passes (and after the first),
with one sync when nothing happened in the window. At a look, each sample's first pass that
met its criterion is found among the window's kept iterates, so counts and answers are exact,
and the stopped rows are dropped from f, x and the solver state (one gather per field).
halting="batch" (`iterate`): one sync per pass; the batch stops at the first iterate where
every sample meets its criterion or has diverged, and returns that iterate.
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
MAX_CODE = int(Status.MAX_ITER)


def _limit(rn: Tensor, fnorm: Tensor, floor: float) -> Tensor:
    """Per sample, the residual beyond which it is DIVERGED: DIVERGENCE_FACTOR times its
    starting scale, floored; a non-finite start gives the floor (so it is DIVERGED at once)."""
    scale = torch.nan_to_num(rn + fnorm, nan=floor, posinf=floor)
    return torch.clamp_min(scale, floor).mul_(DIVERGENCE_FACTOR)


def _norms(g: Tensor, fz: Tensor, dims: Tuple[int, ...], norm: str) -> Tuple[Tensor, Tensor]:
    if norm == "l2":
        return torch.linalg.vector_norm(g, dim=dims), torch.linalg.vector_norm(fz, dim=dims)
    return g.abs().amax(dim=dims), fz.abs().amax(dim=dims)


class _Finished:
    """Rows that stopped together: original indices (None: all rows, in order) and results."""

    __slots__ = ("rows", "z", "residual", "iterations", "status")

    def __init__(self, rows: Optional[Tensor], z: Tensor, residual: Tensor, iterations: Any,
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


def _check_start(z0: Tensor) -> None:
    """A clear error for a non-finite start (called only when the first pass is not clean:
    a finite residual at z0 already shows that z0 is finite)."""
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains nan or inf: start from a finite point (zeros, or a previous solution).")


def _measurer(rule: Residual, halt: Optional[Halt], z0: Tensor) -> Callable[..., Tuple[Any, ...]]:
    """measure(z, fz, hstate) -> (g, ||g||, ||f(z)||, excess, hstate) for one pass: excess <= 0
    where the sample's criterion holds (the residual rule's margin, or -1/+1 from `halt`).
    Under Unroll (grad mode) the decisions use detached norms."""
    dims = tuple(range(1, z0.ndim))
    neg_rtol = _constant(-rule.rtol, z0.dtype, z0.device)
    atol_t = _constant(rule.atol, z0.dtype, z0.device) if rule.atol > 0 else None
    one, minus_one = _constant(1.0, z0.dtype, z0.device), _constant(-1.0, z0.dtype, z0.device)
    recording = torch.is_grad_enabled()

    def measure(z: Tensor, fz: Tensor, hstate: Any) -> Tuple[Any, ...]:
        g = fz - z
        rn, fnorm = _norms(g.detach(), fz.detach(), dims, rule.norm) if recording else _norms(g, fz, dims, rule.norm)
        if halt is None:
            excess = torch.addcmul(rn, fnorm, neg_rtol)   # rn - rtol ||fz||; <= atol: met
            if atol_t is not None:
                excess = excess - atol_t
        else:
            stop, hstate = halt(z.detach(), fz.detach(), hstate)
            excess = torch.where(stop, minus_one, one)
        return g, rn, fnorm, excess, hstate

    return measure


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
    check_every: int = 1,
    keep: Tuple[int, ...] = (),
) -> Solution:
    """Solve z = fn(z, x) from z0, given fz0 = fn(z0, x); z comes back in the loop's layout.

    `keep`: passes (1-based evaluation counts) whose iterates go to `sol.path` (see `_kept_path`).

    `rule` is the residual rule (it decides CONVERGED and the reported residual's norm); with
    `halt`, that criterion decides instead and its halts are HALTED. `round_fn` maps each new
    iterate to the user's precision (float16/bfloat16), so statuses hold at the returned values.
    Runs under no_grad, except for Unroll(), where autograd records it (decisions then use
    detached norms)."""
    if per_sample:
        return _iterate_sample(fn, z0, x, fz0, solver, rule=rule, halt=halt, max_iter=max_iter,
                               record=record, round_fn=round_fn, check_every=check_every, keep=keep)
    B, dev, dtype = z0.shape[0], z0.device, z0.dtype
    bcast = (-1,) + (1,) * (z0.ndim - 1)
    measure = _measurer(rule, halt, z0)
    done_code = int(Status.CONVERGED) if halt is None else int(Status.HALTED)
    floor = math.sqrt(z0[0].numel()) if rule.norm == "l2" else 1.0

    # halting="batch": every sample receives every pass (f may mix them). The batch stops when,
    # at one iterate, every sample meets its criterion or has diverged, and returns that
    # iterate: the statuses are those at it. A diverged row is frozen at its last finite
    # iterate (safe_z) so it cannot poison a map that mixes rows.
    dead_mask: Optional[Tensor] = None
    any_dead = False
    z, fz = z0, fz0
    safe_z = safe_r = limit = None
    state = None
    hstate = halt.init(z0) if halt is not None else None
    evaluations = 0
    trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]] = [] if record else None

    kept: List[Tuple[int, Optional[Tensor], Tensor]] = []  # (pass, rows, z) kept for sol.path
    k = 0
    while True:
        if k > 0:
            fz = _call_f(fn, z, x, k, B, B)
        evaluations += B
        if k + 1 in keep:
            kept.append((k + 1, None, z))
        g, rn, fnorm, excess, hstate = measure(z, fz, hstate)
        if trace_rows is not None:
            trace_rows.append((None, rn))
        if limit is None:
            limit = _limit(rn, fnorm, floor)
        # The one host sync of a pass: is every sample still running and within bounds?
        # (nan fails the `> 0` test, so non-finite values are caught.)
        if torch.minimum(limit - rn, excess).min().item() > 0:
            safe_z, safe_r = z, rn
        else:
            if k == 0:
                _check_start(z0)
            bad = ~(rn <= limit)      # non-finite, or blown up
            safe_z = z if safe_z is None else torch.where(bad.view(bcast), safe_z, z)
            safe_r = rn if safe_r is None else torch.where(bad, safe_r, rn)
            dead_mask = bad if dead_mask is None else dead_mask | bad
            met = (excess <= 0) | dead_mask
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

    status = torch.where((excess <= 0) & (rn <= limit), done_code, int(Status.MAX_ITER))
    if dead_mask is not None:
        status = torch.where(dead_mask, int(Status.DIVERGED), status)
        # (a row that died at this pass goes back to its last finite iterate and its residual)
        z = torch.where(dead_mask.view(bcast), safe_z, z)
        rn = torch.where(dead_mask & bad, safe_r, rn)
    iterations = torch.full((B,), k + 1, dtype=torch.int64, device=dev)
    sol = _result(z, rn, iterations, status, evaluations, trace_rows, B, dtype)
    if keep:
        sol.path = _kept_path(keep, kept, sol.z, sol.iterations, k + 1)
    return sol


def _iterate_sample(
    fn: Callable[[Tensor, Any], Tensor], z0: Tensor, x: Any, fz0: Tensor, solver: Solver, *,
    rule: Residual, halt: Optional[Halt], max_iter: int, record: bool,
    round_fn: Optional[Callable[[Tensor], Tensor]], check_every: int, keep: Tuple[int, ...] = (),
) -> Solution:
    """halting="sample": every sample stops at its own pass; stopped rows leave f's batch.

    The host looks every `check_every` passes. Between two looks a pass is f, one subtraction
    and two norms: the iterates and norms of the window are kept (references, no copies), and
    at the look each sample's first pass that met its criterion (or diverged, or spent the
    budget) is found, so iteration counts and returned iterates are exact; a sample that
    stopped inside the window only cost the rows of the passes after it. Rows are dropped
    from f, x and the solver state at the look (one gather per field).
    """
    B, dev, dtype = z0.shape[0], z0.device, z0.dtype
    rows_b = (-1,) + (1,) * (z0.ndim - 1)        # a [b] mask against [b, ...]
    at_b = (1, -1) + (1,) * (z0.ndim - 1)         # a [b] pass index against [w, b, ...]
    measure = _measurer(rule, halt, z0)
    done_code = int(Status.CONVERGED) if halt is None else int(Status.HALTED)
    floor = math.sqrt(z0[0].numel()) if rule.norm == "l2" else 1.0
    compact_state = getattr(solver, "compact", None) or compact

    finished: List[_Finished] = []
    idx: Optional[Tensor] = None          # original row of each active row (made at the first drop)
    z, xa, fz = z0, x, fz0
    best_z: Optional[Tensor] = None       # best iterate before the current window (None: none yet)
    best_r: Optional[Tensor] = None
    limit: Optional[Tensor] = None
    state = None
    hstate = halt.init(z0) if halt is not None else None
    n_active, evaluations = B, 0
    trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]] = [] if record else None
    win_z: List[Tensor] = []
    win_r: List[Tensor] = []
    win_e: List[Tensor] = []              # excess over the tolerance (<= 0: met), or -1/+1
    step_cache: dict = {}

    def steps_of(w: int) -> Tensor:
        """[w, 1] pass indices 0..w-1 (made once per window size)."""
        t = step_cache.get(w)
        if t is None:
            t = step_cache[w] = torch.arange(w, device=dev).view(w, 1)
        return t

    kept: List[Tuple[int, Optional[Tensor], Tensor]] = []  # (pass, rows, z) kept for sol.path
    k = 0
    while True:
        if k > 0:
            fz = _call_f(fn, z, xa, k, n_active, B)
        evaluations += n_active
        if k + 1 in keep:
            kept.append((k + 1, idx, z))
        g, rn, fnorm, excess, hstate = measure(z, fz, hstate)
        if trace_rows is not None:
            trace_rows.append((idx, rn))
        if limit is None:
            limit = _limit(rn, fnorm, floor)
        win_z.append(z)
        win_r.append(rn)
        win_e.append(excess)
        last = k + 1 >= max_iter
        stay = None
        if len(win_z) == check_every or last or k == 0:   # (a look after the first pass
            # catches a warm start that is already a fixed point)
            # ---- the look: one host sync when nothing happened in the window -------------
            R, E = torch.stack(win_r), torch.stack(win_e)        # [w, b]
            w = R.shape[0]
            # nothing to do: no sample met, diverged, or failed to improve (then the last
            # iterate is every sample's best and no iterate is copied). A residual below the
            # best before it is finite and in bounds; the very first one is checked against
            # the divergence limit.
            if best_r is None:
                improve = torch.cat((limit - R[:1], R[:-1] - R[1:]))
            else:
                improve = torch.cat((best_r.unsqueeze(0), R[:-1])) - R
            steady = torch.minimum(E, improve)
            quiet = not last and steady.min().item() > 0
            if quiet:
                best_z, best_r = z, rn
            else:
                if best_r is None:
                    _check_start(z0)
                bad = ~(R <= limit)                                     # non-finite, or blown up
                # status per pass (-1: runs on); a sample stops at its first pass with one
                steps = steps_of(w)
                tail: Any = -1                           # (the budget's last pass stops every row)
                if last:
                    tail = MAX_CODE if w == 1 else torch.where(steps == w - 1, MAX_CODE, -1)
                code = torch.where(bad, int(Status.DIVERGED), torch.where(E <= 0, done_code, tail))
                first = torch.where(code >= 0, steps, w).amin(dim=0)            # w: runs on
                at = first.clamp_max(w - 1)
                codes = torch.where(first < w, code.gather(0, at.view(1, -1)).squeeze(0), -1)
                met_at = codes == done_code
                # Common at the end of a solve: every row met its criterion at one same pass p.
                # Then the answer is that pass's iterate as it is (one sync, no gathers).
                n_met, lo, hi = torch.stack((met_at.sum(), first.amin(), first.amax())).tolist()
                if n_met == n_active and lo == hi:
                    finished.append(_Finished(idx, win_z[lo], R[lo], k + 1 - (w - 1) + lo,
                                              torch.full_like(codes, done_code)))
                    n_active = 0
                    break
                # each row's answer: the pass where its criterion held, else its best (the
                # smallest residual, earliest on ties, over the passes up to its stop, merged
                # with the best before the window)
                wr, wb = torch.where(steps <= first, R.nan_to_num(math.inf), math.inf).min(dim=0)
                sel = torch.where(met_at, at, wb)
                if w == 1:   # (no copy, and no index kept for backward when Unroll records)
                    pick = win_z[0]
                else:
                    Z = torch.stack(win_z)
                    pick = Z.gather(0, sel.view(at_b).expand((1,) + tuple(Z.shape[1:]))).squeeze(0)
                pick_r = R.gather(0, sel.view(1, -1)).squeeze(0)
                if best_r is None:    # (the start is the best so far, even when its residual is nan)
                    out_z, out_r = pick, pick_r
                else:
                    better = (wr < best_r) | met_at
                    out_z = torch.where(better.view(rows_b), pick, best_z)
                    out_r = torch.where(better, pick_r, best_r)
                its = k + 1 - (w - 1) + at                  # evaluations at the stop pass
                done = codes >= 0
                n_done = int(done.sum())                      # (the host sync of a busy look)
                if n_done == n_active:
                    finished.append(_Finished(idx, out_z, out_r, its, codes))
                    n_active = 0
                    break
                best_z, best_r = out_z, out_r
                if n_done:
                    order = torch.argsort(done, stable=True)
                    n_active -= n_done
                    stay = order[:n_active]
                    idx = order if idx is None else idx.index_select(0, order)
                    best_z, best_r, limit, codes, its = (
                        t.index_select(0, order) for t in (best_z, best_r, limit, codes, its))
                    finished.append(_Finished(idx[n_active:], best_z[n_active:], best_r[n_active:],
                                              its[n_active:], codes[n_active:]))
                    idx, best_z, best_r, limit = idx[:n_active], best_z[:n_active], best_r[:n_active], limit[:n_active]
                    xa = select_rows(xa, stay)
                    if hstate is not None:
                        hstate = compact_rows(hstate, stay)
            win_z, win_r, win_e = [], [], []
        # The solver steps on the rows it has seen, then the rows that stopped are dropped
        # from its output (so f(z) and g are never copied).
        if state is None:
            state = solver.init(z, fz, g)
        z, state = solver.step(state, z, fz, g, k)
        if stay is not None:
            z = z.index_select(0, stay)
            state = compact_state(state, stay)
        if round_fn is not None:
            z = round_fn(z)
        k += 1
    sol = _result(*_assemble(finished, B), evaluations, trace_rows, B, dtype)
    if keep:
        sol.path = _kept_path(keep, kept, sol.z, sol.iterations, int(sol.iterations.min()))
    return sol


def _kept_path(keep: Tuple[int, ...], kept: List[Tuple[int, Optional[Tensor], Tensor]], z: Tensor,
               it: Tensor, fewest: int) -> List[Tensor]:
    """Per pass p of `keep`, every sample's iterate at pass p, [B, ...] in the loop's layout.

    A sample that stopped before pass p (it < p) gives its returned iterate `z` instead. The
    iterates are the loop's own tensors (references): a copy is made only for a pass that some
    sample did not reach (`fewest`: the fewest passes any sample received) or after rows left f.
    """
    at = {p: (rows, zp) for p, rows, zp in kept}
    path = []
    for p in keep:
        if p not in at:                   # (the loop stopped before pass p)
            path.append(z)
            continue
        rows, zp = at[p]
        full = zp if rows is None else z.index_copy(0, rows, zp)
        if p > fewest:
            full = torch.where((it >= p).view((-1,) + (1,) * (z.ndim - 1)), full, z)
        path.append(full)
    return path


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
        # (passes that ran between a sample's stop and the next look are not its history)
        T = int(it.max())
        trace = trace[:T].masked_fill(torch.arange(T, device=z.device)[:, None] >= it[None, :], float("nan"))
    converged = (status == int(Status.CONVERGED)) | (status == int(Status.HALTED))
    return Solution(z=z, iterations=it, residual=r, converged=converged, status=status, evaluations=evaluations, trace=trace)


def _assemble(finished: List[_Finished], B: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Put the finished chunks back in the original row order, with their status codes."""
    dev = finished[0].z.device
    codes = [torch.full((c.z.shape[0],), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
             if c.status is None else c.status for c in finished]
    if len(finished) == 1:   # everyone stopped together and no row was ever dropped
        c = finished[0]
        its = c.iterations if isinstance(c.iterations, Tensor) else torch.full((B,), c.iterations, dtype=torch.int64, device=dev)
        return c.z, c.residual, its, codes[0]
    # Every chunk has its original rows once one was dropped; they form a permutation.
    inverse = torch.argsort(torch.cat([c.rows for c in finished]))
    its = torch.cat([c.iterations if isinstance(c.iterations, Tensor) else
                     torch.full((c.z.shape[0],), c.iterations, dtype=torch.int64, device=dev) for c in finished])
    pick = lambda parts: torch.cat(parts).index_select(0, inverse)  # noqa: E731
    return (pick([c.z for c in finished]), pick([c.residual for c in finished]),
            its.index_select(0, inverse), pick(codes))
