"""The iteration loop: halting, compaction, best-iterate tracking, divergence, status, trace.

Solvers only propose the next iterate (`solvers._base.Solver`); everything a user reads in a
`Solution` is decided here, the same way for every solver.

halting="sample" (`_iterate_sample`): a pass is f, one subtraction and two per-sample norms
(plus the criterion); the host looks once every `check_every` passes (and after the first):
the window's norms go to the host in one sync and its decisions are made in numpy. At a look,
each sample's first pass that met its criterion is found among the window's kept iterates, so
counts and answers are exact; the stopped rows are gathered from the pass that holds each
answer and dropped from f, x and the solver state (one gather per field).
halting="batch" (`iterate`): one sync per pass; the batch stops at the first iterate where
every sample meets its criterion or has diverged, and returns that iterate.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
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
    """Rows that stopped together: their states, and on the host their original indices (None:
    all rows, in order), residuals, iteration counts and status codes."""

    __slots__ = ("rows", "z", "residual", "iterations", "status")

    def __init__(self, rows: Optional[np.ndarray], z: Tensor, residual: np.ndarray, iterations: np.ndarray,
                 status: np.ndarray) -> None:
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
    and two norms: the iterates and norms of the window are kept (references, no copies). At
    the look the window's norms go to the host (one sync), where each sample's first pass
    that met its criterion (or diverged, or spent the budget) is found, so iteration counts
    and returned iterates are exact; a sample that stopped inside the window only cost the
    rows of the passes after it. On the device a look gathers the answers of the rows that
    stop (one gather per pass that holds them; nothing is copied while every residual keeps
    falling) and drops those rows from f, x and the solver state (one gather per field).
    """
    B, dev, dtype = z0.shape[0], z0.device, z0.dtype
    measure = _measurer(rule, halt, z0)
    done_code = int(Status.CONVERGED) if halt is None else int(Status.HALTED)
    floor = math.sqrt(z0[0].numel()) if rule.norm == "l2" else 1.0
    compact_state = getattr(solver, "compact", None) or compact
    rows_on_device = record or bool(keep)        # (the trace and sol.path index by original row)

    finished: List[_Finished] = []
    idx: Optional[np.ndarray] = None      # original row of each active row (None: all, in order)
    idx_t: Optional[Tensor] = None        # the same on the device, when the trace or path needs it
    z, xa, fz = z0, x, fz0
    best_z: Optional[Tensor] = None       # holds each active row's best iterate before the window,
    best_row: Optional[np.ndarray] = None  # at these rows (None: row i of active row i)
    best_r: Optional[np.ndarray] = None   # (None: no look yet)
    limit_t: Optional[Tensor] = None
    limit: Optional[np.ndarray] = None
    state = None
    hstate = halt.init(z0) if halt is not None else None
    n_active, evaluations = B, 0
    trace_rows: Optional[List[Tuple[Optional[Tensor], Tensor]]] = [] if record else None
    win_z: List[Tensor] = []              # the window's iterates (references), their residual
    win_r: List[Tensor] = []              # norms and excess over the tolerance (<= 0: met; or
    win_e: List[Tensor] = []              # -1/+1 from a criterion)
    kept: List[Tuple[int, Optional[Tensor], Tensor]] = []  # (pass, rows, z) kept for sol.path
    k = 0
    while True:
        if k > 0:
            fz = _call_f(fn, z, xa, k, n_active, B)
        evaluations += n_active
        if k + 1 in keep:
            kept.append((k + 1, idx_t, z))
        g, rn, fnorm, excess, hstate = measure(z, fz, hstate)
        if trace_rows is not None:
            trace_rows.append((idx_t, rn))
        if limit_t is None:
            limit_t = _limit(rn, fnorm, floor)
        win_z.append(z)
        win_r.append(rn)
        win_e.append(excess)
        last = k + 1 >= max_iter
        stay = None
        if len(win_z) == check_every or last or k == 0:   # (a look after the first pass
            # catches a warm start that is already a fixed point)
            w = len(win_z)
            if limit is None:
                R, E, lim = host_arrays(torch.stack(win_r), torch.stack(win_e), limit_t)
                limit = lim
                if not np.isfinite(R[0]).all():
                    _check_start(z0)
            else:
                R, E = host_arrays(torch.stack(win_r), torch.stack(win_e))
            first, codes = first_stops(R, E <= 0, limit, w - 1 if last else w, done_code)
            if (codes < 0).all() and (best_r is None or (R[-1] < best_r).all()) and (R[1:] < R[:-1]).all():
                # quiet: nothing stopped and every residual fell at every pass, so the last
                # iterate is every row's best (no gather, no copy)
                best_z, best_row, best_r = win_z[-1], None, R[-1]
            else:
                cols = np.arange(n_active)
                its = k + 1 - (w - 1) + np.minimum(first, w - 1)   # evaluations at the stop pass
                # each row's answer: the pass where its criterion held, else its best up to its
                # stop, if that beats its best before the window
                sel, better = window_answers(R, first, codes == done_code, best_r)
                out_r = R[sel, cols] if best_r is None else np.where(better, R[sel, cols], best_r)
                # Where each row's answer lives: row i of the window's pass src[i], or (src == w)
                # row best_row[i] of best_z. Rows are gathered only when they leave, or when the
                # rows that stay no longer share one source (a falling residual is never copied).
                src = np.where(better, sel, w)
                sources = win_z + [best_z]
                rows_in = lambda r: r if best_row is None else np.where(src[r] == w, best_row[r], r)  # noqa: E731
                done = codes >= 0
                gone = np.flatnonzero(done)
                for part in _by_source(src, gone):
                    p = int(src[part[0]])
                    whole = part.size == n_active and (p < w or best_row is None or
                                                       (best_row.size == best_z.shape[0] and (best_row == cols).all()))
                    zp = sources[p] if whole else sources[p].index_select(0, _index(rows_in(part), dev))
                    finished.append(_Finished(idx if whole else (part if idx is None else idx[part]), zp,
                                              out_r[part], its[part], codes[part]))
                if gone.size == n_active:
                    n_active = 0
                    break
                stay_rows = np.flatnonzero(~done) if gone.size else cols
                parts = _by_source(src, stay_rows)
                if len(parts) == 1:                 # (one source: keep it, with a row map)
                    p = int(src[stay_rows[0]])
                    best_row = rows_in(stay_rows) if p == w else stay_rows
                    best_z = sources[p]
                else:
                    best_z = torch.cat([sources[int(src[q[0]])].index_select(0, _index(rows_in(q), dev)) for q in parts])
                    best_row = np.empty(stay_rows.size, dtype=np.int64)
                    best_row[np.searchsorted(stay_rows, np.concatenate(parts))] = np.arange(stay_rows.size)
                best_r = out_r[stay_rows]
                if gone.size:
                    stay = _index(stay_rows, dev)
                    n_active = stay_rows.size
                    idx = stay_rows if idx is None else idx[stay_rows]
                    if rows_on_device:
                        idx_t = _index(idx, dev)
                    limit = limit[stay_rows]
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
    sol = _result(*_assemble(finished, B, dev), evaluations, trace_rows, B, dtype)
    if keep:
        sol.path = _kept_path(keep, kept, sol.z, sol.iterations, int(sol.iterations.min()))
    return sol


def _by_source(src: np.ndarray, rows: np.ndarray) -> List[np.ndarray]:
    """`rows` grouped by their value in `src` (ascending rows within a group)."""
    if rows.size == 0:
        return []
    s = src[rows]
    if (s == s[0]).all():
        return [rows]
    return [rows[s == v] for v in np.flatnonzero(np.bincount(s))]


def first_stops(R: np.ndarray, met: np.ndarray, limit: np.ndarray, budget: Any,
                done_code: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row of a window [w, b] of residual norms: its first pass with a status (w: none)
    and that status (-1: runs on). `budget`: the pass (per row, or one for all) where the
    row's budget ends (>= w: not in this window). DIVERGED (non-finite, or beyond `limit`)
    beats the criterion (`met`), which beats the budget. Used by `solve` and `stream` alike."""
    ok = R <= limit
    stop = met | ~ok
    w, cols = R.shape[0], np.arange(R.shape[1])
    first = stop.argmax(0)
    first[~stop[first, cols]] = w
    first = np.maximum(np.minimum(first, budget), 0)    # (a stream's idle slots run past it)
    at = np.minimum(first, w - 1)
    codes = np.where(~ok[at, cols], int(Status.DIVERGED), np.where(met[at, cols], done_code, MAX_CODE))
    codes[first == w] = -1
    return first, codes


def window_answers(R: np.ndarray, first: np.ndarray, done: np.ndarray,
                   best_r: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Per row: the pass holding its answer (where its criterion held, else its smallest
    residual up to its stop, earliest on ties as torch.min), and whether that beats its best
    before the window (`best_r`; None or nan: none yet)."""
    w, cols = R.shape[0], np.arange(R.shape[1])
    Rm = np.where((np.arange(w)[:, None] <= first) & ~np.isnan(R), R, np.inf)
    sel = np.where(done, first, Rm.argmin(0))
    if best_r is None:
        return sel, np.ones(R.shape[1], dtype=bool)
    return sel, (Rm[sel, cols] < best_r) | np.isnan(best_r) | done


_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_}


def host_arrays(*ts: Tensor) -> List[np.ndarray]:
    """Small tensors as numpy arrays: views on a CPU, else one transfer (the look's one sync)."""
    if ts[0].device.type == "cpu":
        try:
            return [t.numpy() for t in ts]
        except RuntimeError:   # (tensors without storage, under torch.func transforms)
            return [np.array(t.tolist(), dtype=_NUMPY[t.dtype]) for t in ts]
    return joined_to_host(*ts)


def joined_to_host(*ts: Tensor) -> List[np.ndarray]:
    """Tensors (floats of one dtype, or bool) brought to the host in one copy: concatenated
    on their device, then split (an accelerator's look pays one transfer, not one each)."""
    flat = torch.cat([t.reshape(-1).to(ts[0].dtype) for t in ts]).cpu().numpy()
    out, at = [], 0
    for t in ts:
        part = flat[at:at + t.numel()].reshape(tuple(t.shape))
        out.append(part.astype(_NUMPY[t.dtype]) if t.dtype == torch.bool else part)
        at += t.numel()
    return out


def _index(a: np.ndarray, dev: torch.device) -> Tensor:
    """An index array as an int64 tensor on the device."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)


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


def _assemble(finished: List[_Finished], B: int, dev: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Put the finished chunks (host-side numbers) back in the original row order, as tensors."""
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    if len(finished) == 1:   # everyone stopped together and no row was ever dropped
        c = finished[0]
        return c.z, tensor(c.residual), tensor(c.iterations), tensor(c.status)
    # Every chunk has its original rows once one was dropped; they form a permutation.
    inverse = np.argsort(np.concatenate([c.rows for c in finished]), kind="stable")
    pick = lambda name: tensor(np.concatenate([getattr(c, name) for c in finished])[inverse])  # noqa: E731
    z = torch.cat([c.z for c in finished]).index_select(0, _index(inverse, dev))
    return z, pick("residual"), pick("iterations"), pick("status")
