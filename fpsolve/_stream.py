"""`fpsolve.stream` / `solve_stream`: continuous batching of fixed-point solves at a fixed shape.

`slots` rows are in flight. Every pass evaluates f on exactly `[slots, ...]` and runs the
solver step, the residual norms and the criterion as tensor ops, with no host sync and no
data-dependent shape (so a compiled f, or CUDA graphs, never recompile). The last
`check_every` iterates of every slot are kept in a ring (two alternating halves, so the
previous window's iterates survive the next look); every `check_every` passes the window's
per-slot norms go to the host in one transfer and the look's decisions are made there in
numpy (`_look`): each slot whose sample stopped inside the window is emitted from the ring at
the exact pass where it stopped (its iteration count is exact; only the passes after that
were wasted) and the slot takes the next pending input. On the device a look is one gather
of the emitted rows, one of best iterates that are about to be overwritten (none while
residuals fall), and the refill.

Per sample the result is what `solve` gives that sample alone: the iterate where its
criterion first held (CONVERGED / HALTED), or its best iterate when the budget ran out
(MAX_ITER) or it blew up (DIVERGED); a refilled slot's solver history starts fresh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._criteria import make_criterion
from ._loop import _NUMPY, DIVERGENCE_FACTOR, Halt, _index, first_stops, host_arrays, window_answers
from ._solution import Solution, Status
from ._checks import as_bool, as_tolerances
from ._solve import DEFAULT_CHECK_EVERY, NORMS, _check_choice, check_max_iter, make_solver
from .solvers.fixed_point import FixedPointIteration
from ._tree import StateLayout, tensors_in




class StreamResult(NamedTuple):
    """One sample's result from `stream`: its position in the stream, its fixed point and how it stopped.

    Attributes:
        index: The sample's position in the stream (0-based, counting rows over all batches).
        z: The sample's state, without the batch dimension, in the state's structure and dtype.
        iterations: Evaluations of f that the sample received.
        residual: ||f(z) - z|| at `z`.
        status: Why it stopped (`Status.CONVERGED`, `MAX_ITER`, `DIVERGED` or `HALTED`).

    Example:
        ```python
        batches = [torch.ones(3, 2), 2 * torch.ones(2, 2)]
        for r in fpsolve.stream(lambda z, x: 0.5 * z + x, batches, slots=4):
            assert r.status == fpsolve.Status.CONVERGED and r.z.shape == (2,)
            print(r.index, r.iterations, round(float(r.z[0]), 3))   # z* = 2x
        ```
    """

    index: int
    z: Any            # one sample (no batch dimension), in the state's structure and dtype
    iterations: int
    residual: float
    status: Status


@dataclass
class _Chunk:
    """Results emitted at one check: the states (loop layout [n, ...]) and host-side numbers."""

    index: np.ndarray
    z: Tensor
    iterations: np.ndarray
    residual: np.ndarray
    status: np.ndarray


class _Rows:
    """The input stream as rows: pulls batches from `inputs` and hands out the next n rows."""

    def __init__(self, inputs: Iterable[Any]) -> None:
        if isinstance(inputs, (Tensor, dict)) or inputs is None or not hasattr(inputs, "__iter__"):
            raise TypeError(
                "inputs must be an iterable of batches (e.g. a list of tensors or a DataLoader); "
                f"got {type(inputs).__name__}. To stream one batch, pass [x]."
            )
        self.it = iter(inputs)
        self.parts: List[Tuple[List[Tensor], int]] = []   # pending batches as (leaves, rows),
        # the first one from row `self.start`
        self.template: Any = None                          # the first batch (its structure)
        self.start = 0
        self.pending = 0
        self.done = False
        self.row_spec: Optional[List[Tuple[torch.Size, torch.dtype]]] = None
        self.batches = 0

    def _pull(self) -> bool:
        try:
            batch = next(self.it)
        except StopIteration:
            self.done = True
            return False
        leaves = tensors_in(batch)
        self.batches += 1
        if not leaves or not _same_structure_leaves(batch, leaves):
            raise TypeError(
                f"inputs: batch {self.batches} must be a tensor or a tuple/list/dict of tensors "
                f"(batch-first); got {type(batch).__name__}."
            )
        b = leaves[0].shape[0] if leaves[0].ndim else -1
        spec = [(t.shape[1:], t.dtype) for t in leaves]
        if any(t.ndim == 0 or t.shape[0] != b for t in leaves):
            raise ValueError(f"inputs: batch {self.batches} holds tensors with different batch sizes; every "
                             f"tensor of a batch must share dimension 0.")
        if self.row_spec is None:
            self.row_spec, self.template = spec, batch
        elif spec != self.row_spec:
            raise ValueError(
                f"inputs: batch {self.batches} has rows of shape/dtype "
                f"{[(tuple(s), d) for s, d in spec]}, but the first batch had "
                f"{[(tuple(s), d) for s, d in self.row_spec]}: every row of a stream must have the "
                f"same shape (f sees a fixed [slots, ...] batch). Pad, or stream each shape separately."
            )
        if b:
            self.parts.append((leaves, b))
            self.pending += b
        return True

    def take(self, n: int) -> Tuple[Optional[List[Tensor]], int]:
        """Up to n next rows, as the leaves of one batch (None when the stream is exhausted)."""
        while self.pending < n and not self.done:
            self._pull()
        n = min(n, self.pending)
        if n == 0:
            return None, 0
        pieces, need = [], n
        while need:
            leaves, size = self.parts[0]
            m = min(need, size - self.start)
            pieces.append([t[self.start:self.start + m] for t in leaves])
            need -= m
            if m == size - self.start:
                self.parts.pop(0)
                self.start = 0
            else:
                self.start += m
        self.pending -= n
        if len(pieces) == 1:
            return pieces[0], n
        return [torch.cat(ts) for ts in zip(*pieces)], n

    def structure(self, leaves: List[Tensor]) -> Any:
        """Leaves back in the structure of the stream's batches (what f and z0 receive)."""
        return _unflatten(self.template, iter(leaves))


def _unflatten(template: Any, leaves: Iterator[Tensor]) -> Any:
    if isinstance(template, Tensor):
        return next(leaves)
    if isinstance(template, dict):
        return {k: _unflatten(v, leaves) for k, v in template.items()}
    return type(template)(_unflatten(v, leaves) for v in template)


def _same_structure_leaves(batch: Any, leaves: List[Tensor]) -> bool:
    return isinstance(batch, (Tensor, tuple, list, dict)) and len(leaves) == _count_leaves(batch)


def _count_leaves(x: Any) -> int:
    if isinstance(x, Tensor):
        return 1
    if isinstance(x, dict):
        return sum(_count_leaves(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_count_leaves(v) for v in x)
    return 1   # (a non-tensor leaf: counted, so the structure check fails)


def _start_rows(z0: Any, x_rows: Any, n: int) -> Any:
    """The starting state rows for n new samples."""
    if z0 is None:
        if not isinstance(x_rows, Tensor):
            raise ValueError(
                "stream: the inputs are not single tensors, so the state cannot default to zeros "
                "shaped like them; pass z0 (one state row [1, ...], or a callable z0(x_rows))."
            )
        if not x_rows.is_floating_point():
            raise TypeError(f"stream: z0=None makes zeros shaped like the inputs, but they are {x_rows.dtype}; pass z0.")
        return torch.zeros_like(x_rows)
    if callable(z0):
        out = z0(x_rows)
    else:
        leaves = tensors_in(z0)
        if not leaves or any(t.ndim == 0 or t.shape[0] != 1 for t in leaves):
            raise ValueError(
                "stream: z0 must be None, a callable z0(x_rows) -> state rows, or one state row "
                "with batch dimension 1 ([1, ...], or a tuple of such) shared by every sample."
            )
        if isinstance(z0, Tensor):
            return z0.expand(n, *z0.shape[1:])
        return type(z0)(t.expand(n, *t.shape[1:]) for t in z0)
    got = tensors_in(out)
    if not got or any(t.ndim == 0 or t.shape[0] != n for t in got):
        raise ValueError(f"stream: z0(x_rows) must return state rows with batch size {n} (one per input row).")
    return out


class _Slots:
    """Each slot's per-sample bookkeeping on the host (numpy): a look costs microseconds, not
    dozens of device ops, and the device keeps only the state-sized tensors."""

    def __init__(self, S: int, K: int, n0: int, dtype: np.dtype, floor: float) -> None:
        self.age = np.zeros(S, dtype=np.int64)           # evaluations the slot's sample has had
        self.limit = np.zeros(S, dtype=dtype)            # its divergence limit (set at its first pass)
        self.best_r = np.full(S, np.nan, dtype=dtype)    # its best residual so far (nan: none yet)
        self.floor, self.factor = dtype.type(floor), dtype.type(DIVERGENCE_FACTOR)
        self.active = np.arange(S) < n0                  # the slot holds a sample not yet emitted
        self.sample = np.arange(S, dtype=np.int64)       # the sample's index in the stream
        self.cols = np.arange(S)
        self.steps = np.arange(K)[:, None]


def _look(R: np.ndarray, Fn: np.ndarray, met: np.ndarray, st: _Slots, max_iter: int,
          done_code: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One check of a window of K passes, on the host: each slot's first stop and its status
    there, the pass holding its answer (`sel`: where its criterion held, else its best iterate
    up to the stop), whether that beats its best so far, its iteration count, and which slots
    stop. The same rules, on the same float32/64 numbers, as `solve`'s look."""
    K = R.shape[0]
    cols, age, active = st.cols, st.age, st.active
    fresh = age == 0                                      # samples that started this window
    if fresh.any():   # (their limit, as `_loop._limit`: a non-finite start gives the floor)
        scale = R[0] + Fn[0]
        np.copyto(st.limit, np.where(scale < np.inf, np.fmax(scale, st.floor), st.floor) * st.factor, where=fresh)
    first, codes = first_stops(R, met, st.limit, max_iter - 1 - age, done_code)
    sel, better = window_answers(R, first, codes == done_code, st.best_r)   # (nan for a new sample)
    better &= active
    np.copyto(st.best_r, R[sel, cols], where=better)
    its = age + 1 + first                                 # evaluations at the stop
    st.age = age + K
    return sel, better, codes, its, (codes >= 0) & active


def _stream_chunks(f: Callable[..., Any], inputs: Iterable[Any], *, slots: int, z0: Any, solver: Any,
                   atol: float, rtol: float, max_iter: int, norm: str, criterion: Any,
                   check_every: Optional[int], compile: bool = False) -> Iterator[Tuple[_Chunk, StateLayout]]:
    """The engine: yields the results of each check as one chunk (loop layout)."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x); got {type(f).__name__}.")
    slots = check_max_iter(slots, "slots")
    check_every = DEFAULT_CHECK_EVERY if check_every is None else check_max_iter(check_every, "check_every")
    atol, rtol = as_tolerances(atol, rtol)
    max_iter = check_max_iter(max_iter)
    _check_choice("norm", norm, NORMS)
    rule, other = make_criterion(criterion, atol, rtol, norm)
    solver_obj = make_solver(solver)
    if not getattr(solver_obj, "per_row", False):
        raise TypeError(
            f"stream: solver {solver_obj!r} cannot restart single rows (no `per_row = True`); "
            f"use a built-in solver ('fixed_point', 'anderson', 'broyden')."
        )
    compile = as_bool("compile", compile)
    rows = _Rows(inputs)
    x_first, n0 = rows.take(slots)
    if x_first is None:
        return
    S = slots
    z_first = _start_rows(z0, rows.structure(x_first), n0)
    layout = StateLayout(z_first if isinstance(z_first, Tensor) else tuple(z_first))
    dev, wdt = layout.device, layout.work_dtype
    round_fn = None
    if layout.work_dtype != layout.dtype:
        low = layout.dtype
        round_fn = lambda t: t.to(low).to(t.dtype)  # noqa: E731

    # Slot buffers: when fewer than S inputs exist, idle slots copy row 0 (a valid row).
    fill = torch.arange(S, device=dev).clamp_max_(n0 - 1) if n0 < S else None
    x_leaves = [_private(t if fill is None else t.index_select(0, fill.to(t.device)), dev) for t in x_first]
    x_slots = rows.structure(x_leaves)               # (its leaves are written in place)
    z = layout.pack(z_first).detach().clone()
    if fill is not None:
        z = z.index_select(0, fill)
    floor = math.sqrt(z[0].numel()) if rule.norm == "l2" else 1.0
    st = _Slots(S, check_every, n0, np.dtype(_NUMPY[wdt]), floor)
    # one state row shared by every sample: its rows for a refill, made once
    fixed_start = None if z0 is None or callable(z0) else layout.pack(_start_rows(z0, None, S))
    next_index = n0

    fn = layout.wrap(f, True)
    halt = None if other is None else Halt(other, layout.unpack)
    hstate = halt.init(z) if halt is not None else None
    done_code = int(Status.CONVERGED) if other is None else int(Status.HALTED)
    K = check_every
    # One store of iterates: two rings of K passes (windows alternate between them, so the
    # previous window's iterates survive the next look) and one row per slot for a best
    # iterate that is older than that. Where each slot's answer lives is tracked on the host
    # (`best_at`), so a sample whose residual keeps falling is never copied.
    # Plain iteration's next iterate is f(z) itself, so its window's residuals come from the
    # ring at the look, in three ops for all K passes, and a pass is f and one copy.
    lazy = type(solver_obj) is FixedPointIteration and solver_obj.damping == 1.0 and round_fn is None
    W = K + 1                                        # a ring holds passes 0..K-1 and, lazily, z_K
    store = z.new_empty(((2 * W + 1) * S,) + tuple(z.shape[1:]))
    saved = 2 * W * S                                # first row of the per-slot best rows
    ring_z = store[:saved].view((2, W) + tuple(z.shape))
    best_at = np.zeros(S, dtype=np.int64)            # row of `store` holding each slot's best
    ring_r = z.new_empty(K, S)                       # ||f(z) - z|| at the window's passes
    ring_f = z.new_empty(K, S)                       # ||f(z)|| at them
    ring_met = torch.zeros(K, S, dtype=torch.bool, device=dev)   # a criterion's verdicts
    rz = (ring_z[0].unbind(0), ring_z[1].unbind(0))
    window_norms = _bookkeeping("window", rule.norm, compile)
    rr, rf, rm = ring_r.unbind(0), ring_f.unbind(0), ring_met.unbind(0)
    neg_rtol = torch.tensor(-rule.rtol, dtype=wdt, device=dev)
    needs_k = halt is not None or type(solver_obj) is not FixedPointIteration
    record = _bookkeeping("pass", rule.norm, compile)
    state = None
    parity = 0

    while True:
        # ---- K passes with fixed shapes and no host sync: f, two norms, one copy, the step --
        # each row's k per pass, for the solver's restarts and the criterion's (plain iteration
        # with the residual rule has no use for it)
        ks = torch.from_numpy(st.age + st.steps).to(dev).unbind(0) if needs_k else range(K)
        ring = rz[parity]
        for p in range(K):
            fz = _call(fn, z, x_slots, S)
            if lazy:
                ring[p].copy_(z)
                g = None
            else:
                g = record(z, fz, ring[p], rr[p], rf[p])
            if halt is not None:
                met, hstate = halt(z, fz, other.reset(hstate, ks[p] == 0))
                rm[p].copy_(met)
            if state is None:
                state = solver_obj.init(z, fz, g)
            z, state = solver_obj.step(state, z, fz, g, ks[p])
            if round_fn is not None:
                z = round_fn(z)
        # ---- the look (host): statuses of the window, emit what stopped, refill the slots --
        r_t, f_t = ring_r, ring_f
        if lazy:
            ring[K].copy_(z)
            r_t, f_t = window_norms(ring_z[parity])
        met_t = ring_met if halt is not None else torch.addcmul(r_t, f_t, neg_rtol) <= rule.atol
        R, Fn, M = host_arrays(r_t, f_t, met_t)
        sel, better, codes, its, stops = _look(R, Fn, M, st, max_iter, done_code)
        # a best iterate in the previous window's ring that this window did not beat is saved
        # before the next window overwrites that ring (emitted samples are read out first)
        old = (best_at // (W * S) == parity ^ 1) & ~better & ~stops & st.active
        np.copyto(best_at, parity * W * S + sel * S + st.cols, where=better)
        if old.any():
            keep = np.flatnonzero(old)
            store.index_copy_(0, _index(saved + keep, dev), store.index_select(0, _index(best_at[keep], dev)))
            best_at[keep] = saved + keep
        parity ^= 1
        emit = np.flatnonzero(stops)
        n_emit = emit.size
        if not n_emit:
            continue
        emit_t = _index(emit, dev)
        yield _Chunk(st.sample[emit], store.index_select(0, _index(best_at[emit], dev)), its[emit],
                     st.best_r[emit], codes[emit]), layout
        # Refill the emitted slots with the next inputs (idle slots copy a live row).
        x_new, n_new = rows.take(n_emit)
        if n_new:
            slot = emit_t[:n_new]
            for buf, t in zip(x_leaves, x_new):
                buf.index_copy_(0, slot, t if t.device == buf.device else t.to(buf.device))
            z_new = fixed_start[:n_new] if fixed_start is not None else \
                layout.pack(_start_rows(z0, rows.structure(x_new), n_new))
            z = z.index_copy(0, slot, z_new)
            st.age[emit[:n_new]] = 0
            st.best_r[emit[:n_new]] = np.nan
            st.sample[emit[:n_new]] = np.arange(next_index, next_index + n_new)
            next_index += n_new
        if n_new < n_emit:
            st.active[emit[n_new:]] = False
            live = np.flatnonzero(st.active)
            if live.size == 0:
                return
            idle = emit_t[n_new:]
            src = _index(live[:1], dev).expand(idle.numel())
            for buf in x_leaves:
                buf.index_copy_(0, idle, buf.index_select(0, src))
            z = z.index_copy(0, idle, z.index_select(0, src))
            st.age[emit[n_new:]] = 0


def _record_pass(z: Tensor, fz: Tensor, z_out: Tensor, r_out: Tensor, f_out: Tensor, l2: bool) -> Tensor:
    """A pass's bookkeeping: its iterate into the ring, ||f(z) - z|| and ||f(z)||; returns g."""
    g = fz - z
    dims = tuple(range(1, z.ndim))
    if l2:
        torch.linalg.vector_norm(g, dim=dims, out=r_out)
        torch.linalg.vector_norm(fz, dim=dims, out=f_out)
    else:
        torch.amax(g.abs(), dim=dims, out=r_out)
        torch.amax(fz.abs(), dim=dims, out=f_out)
    z_out.copy_(z)
    return g


def _window_norms(ring: Tensor, l2: bool) -> Tuple[Tensor, Tensor]:
    """Plain iteration's residual norms [K, S] for a whole window from its iterates z_0..z_K
    (f(z_p) = z_(p+1)): the same numbers as pass by pass, in three ops."""
    g = ring[1:] - ring[:-1]
    dims = tuple(range(2, ring.ndim))
    if l2:
        return torch.linalg.vector_norm(g, dim=dims), torch.linalg.vector_norm(ring[1:], dim=dims)
    return g.abs().amax(dim=dims), ring[1:].abs().amax(dim=dims)


_COMPILED: dict = {}   # (what, l2) -> the torch.compile'd bookkeeping, made once per process


def _bookkeeping(what: str, norm: str, compile: bool) -> Callable[..., Any]:
    """`_record_pass` ("pass") or `_window_norms` ("window") for this norm, compiled with
    torch.compile when asked (once per process; dynamo recompiles per shape)."""
    l2 = norm == "l2"
    if what == "pass":
        fn: Callable[..., Any] = lambda z, fz, z_out, r_out, f_out: _record_pass(z, fz, z_out, r_out, f_out, l2)  # noqa: E731
    else:
        fn = lambda ring: _window_norms(ring, l2)  # noqa: E731
    if not compile:
        return fn
    if (what, l2) not in _COMPILED:
        _COMPILED[what, l2] = torch.compile(fn, dynamic=False)
    return _COMPILED[what, l2]


def _private(t: Tensor, device: torch.device) -> Tensor:
    """A private, contiguous copy of an input field on the state's device (written in place)."""
    return t.to(device=device).clone(memory_format=torch.contiguous_format)


def _call(fn: Callable[[Tensor, Any], Tensor], z: Tensor, x: Any, S: int) -> Tensor:
    fz = fn(z, x)
    if not isinstance(fz, Tensor) or fz.shape != z.shape or fz.dtype != z.dtype:
        got = f"shape {tuple(fz.shape)}, dtype {fz.dtype}" if isinstance(fz, Tensor) else type(fz).__name__
        raise ValueError(
            f"stream: f returned {got} for a state of shape {tuple(z.shape)}, dtype {z.dtype}: f must "
            f"return a state shaped like z (and treat the {S} slots independently)."
        )
    return fz


def stream(f: Callable[..., Any], inputs: Iterable[Any], *, slots: int = 64, z0: Any = None,
           solver: Any = "anderson", atol: float = 0.0, rtol: float = 1e-4, max_iter: int = 50,
           norm: str = "l2", criterion: Any = None, check_every: Optional[int] = None,
           compile: bool = False) -> Iterator[StreamResult]:
    """Solve z = f(z, x) for every row of a stream of input batches, `slots` rows at a time.

    Continuous batching: when a row halts, its result is handed out and its slot takes the
    next pending input. Samples leave in the order they halt, not in input order. f always
    receives exactly `[slots, ...]` (idle slots, at the end of the stream, repeat a valid
    row), so a compiled f never recompiles. Per sample the result is what `solve` gives that
    sample alone (a refilled slot's solver history starts fresh). Runs without gradients.

    Args:
        f: `f(z, x) -> ` a state shaped like z; it must treat samples independently.
        inputs: An iterable of batches (a tensor, or a tuple/list/dict of tensors sharing
            the batch size), e.g. a DataLoader; each batch is split into rows.
        slots: Rows in flight (an integer >= 1).
        z0: None: zeros shaped like an input row (x must then be one floating tensor); a
            callable `z0(x_rows) -> ` state rows; or one state row `[1, ...]` used for every
            sample.
        solver: "fixed_point", "anderson", "broyden" or a solver object that has
            `per_row = True` (all built-in solvers).
        atol: Absolute tolerance of the residual rule.
        rtol: Relative tolerance: a sample halts when ||f(z) - z|| <= atol + rtol ||f(z)||.
        max_iter: The most evaluations of f that any one sample receives.
        norm: Per-sample norm of the rule: "l2" or "inf".
        criterion: None (the residual rule) or a criterion object (`Residual`, `Stable`,
            `OutputKL`, `HaltHead`); samples another criterion stops are `HALTED`.
        check_every: Passes between host-side checks (emit and refill); None: fpsolve's
            default (4). Iteration counts are exact whatever it is.
        compile: True compiles the per-pass bookkeeping on the device (the ring copy and
            the residual norms) with `torch.compile` into fused kernels (a few seconds once
            per process and shape; it matters where each op is a kernel launch). The look's
            decisions run on the host either way. Compiling f is yours to do.

    Yields:
        One `StreamResult` (index, z, iterations, residual, status) per sample, as soon as
        it is emitted.

    Raises:
        TypeError: f is not callable, `inputs` is not an iterable of tensors or tensor
            structures, the solver cannot restart single rows (no `per_row = True`), or
            `z0=None` with inputs that are not floating-point.
        ValueError: a bad option (`slots`, `max_iter`, `check_every` < 1, negative or
            both-zero tolerances, unknown `norm`), a batch whose tensors have different batch
            sizes, rows of another shape/dtype than the first batch's, `z0=None` with inputs
            that are not one tensor, or `z0`/f giving states of the wrong shape.

    Example:
        ```python
        batches = [torch.ones(5, 3), torch.full((4, 3), 3.0)]
        results = list(fpsolve.stream(lambda z, x: 0.5 * z + x, batches, slots=4))
        assert sorted(r.index for r in results) == list(range(9))
        assert all(torch.allclose(r.z, 2 * batches[r.index // 5][0], atol=1e-3) for r in results)
        ```
    """
    with torch.no_grad():
        for chunk, layout in _stream_chunks(f, inputs, slots=slots, z0=z0, solver=solver, atol=atol,
                                            rtol=rtol, max_iter=max_iter, norm=norm,
                                            criterion=criterion, check_every=check_every,
                                            compile=compile):
            zs = layout.unpack(chunk.z)
            rows = zip(chunk.index.tolist(), chunk.iterations.tolist(), chunk.residual.tolist(),
                       chunk.status.tolist())
            for i, (idx, it, r, st) in enumerate(rows):
                zi = zs[i] if isinstance(zs, Tensor) else type(zs)(t[i] for t in zs)
                yield StreamResult(idx, zi, it, r, Status(st))


def solve_stream(f: Callable[..., Any], inputs: Iterable[Any], **options: Any) -> Solution:
    """Run `stream` to the end and return one `Solution` with the samples in input order.

    No gradients: `sol.z` is detached, and `trace`/`adjoint` are None.

    Args:
        f: `f(z, x) -> ` a state shaped like z, treating samples independently.
        inputs: An iterable of batches, as for `stream`.
        **options: The keyword options of `stream` (`slots`, `z0`, `solver`, `atol`, `rtol`,
            `max_iter`, `norm`, `criterion`, `check_every`, `compile`), with its defaults.

    Returns:
        A `Solution` over every input row; `evaluations` counts the rows f received (slots
        times passes), idle and wasted slots included. An empty stream gives an empty one.

    Raises:
        TypeError: an option that `stream` does not take, or any error `stream` raises.
        ValueError: as for `stream`.

    Example:
        ```python
        x = torch.linspace(-1, 1, 10).reshape(10, 1)
        sol = fpsolve.solve_stream(lambda z, x: 0.5 * z + x, [x[:6], x[6:]], slots=4)
        assert torch.allclose(sol.z, 2 * x, atol=1e-3)   # input order, z* = 2x
        print(sol.iterations.tolist(), sol.evaluations)
        ```
    """
    allowed = {"slots", "z0", "solver", "atol", "rtol", "max_iter", "norm", "criterion", "check_every", "compile"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"solve_stream got unknown options {sorted(unknown)}; it takes {sorted(allowed)}.")
    chunks: List[_Chunk] = []
    layout = None
    calls = {"n": 0}
    slots = options.get("slots", 64)

    def counted(z: Any, x: Any) -> Any:
        calls["n"] += 1
        return f(z, x)

    with torch.no_grad():
        for chunk, layout in _stream_chunks(counted, inputs, **{"slots": 64, "z0": None, "solver": "anderson",
                                                                "atol": 0.0, "rtol": 1e-4, "max_iter": 50,
                                                                "norm": "l2", "criterion": None,
                                                                "check_every": None, "compile": False, **options}):
            chunks.append(chunk)
    if not chunks:
        empty = torch.zeros(0, dtype=torch.int64)
        return Solution(z=torch.zeros(0), iterations=empty, residual=empty.double(), converged=empty.bool(),
                        status=empty.clone(), evaluations=0)
    order = np.argsort(np.concatenate([c.index for c in chunks]), kind="stable")
    cat = lambda name: torch.from_numpy(np.concatenate([getattr(c, name) for c in chunks])[order])  # noqa: E731
    dev = chunks[0].z.device
    status = cat("status").to(dev)
    z = torch.cat([c.z for c in chunks]).index_select(0, torch.from_numpy(order).to(dev))
    return Solution(z=layout.unpack(z), iterations=cat("iterations").to(dev), residual=cat("residual").to(dev),
                    converged=(status == int(Status.CONVERGED)) | (status == int(Status.HALTED)),
                    status=status, evaluations=calls["n"] * int(slots))


__all__ = ["stream", "solve_stream", "StreamResult", "DEFAULT_CHECK_EVERY"]
