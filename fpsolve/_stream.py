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

from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._checks import as_bool, as_int
from ._criteria import PackedCriterion
from ._options import DEFAULT_CHECK_EVERY, STREAM_DEFAULTS, Options
from ._rules import (NUMPY, Finished, assemble, check_step, check_untouched, first_stops, floor as state_floor,
                     host_arrays, index_tensor, limit_np, rounding, sample_norm, solution, version, window_answers)
from ._solution import Solution, Status
from ._tree import StateLayout, align, leaves, map_tensors, rebuild, tensors_in
from .solvers.fixed_point import FixedPointIteration

#: What `stream` and `solve_stream` take beside the solver options.
ENGINE_DEFAULTS = dict(slots=64, z0=None, compile=False)


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
        self.batches += 1
        if self.template is not None:
            batch = align(self.template, batch, f"inputs: batch {self.batches}")
        parts = leaves(batch)
        leaves_ = [t for t in parts if isinstance(t, Tensor)]
        if not isinstance(batch, (Tensor, tuple, list, dict)) or not leaves_ or len(leaves_) != len(parts):
            raise TypeError(
                f"inputs: batch {self.batches} must be a tensor or a tuple/list/dict of tensors "
                f"(batch-first); got {type(batch).__name__}."
            )
        leaves_t = leaves_
        b = leaves_t[0].shape[0] if leaves_t[0].ndim else -1
        spec = [(t.shape[1:], t.dtype) for t in leaves_t]
        if any(t.ndim == 0 or t.shape[0] != b for t in leaves_t):
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
            self.parts.append((leaves_t, b))
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
        return rebuild(self.template, iter(leaves))


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
        return map_tensors(lambda t: t.expand(n, *t.shape[1:]), z0)
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
        self.floor = floor
        self.active = np.arange(S) < n0                  # the slot holds a sample not yet emitted
        self.sample = np.arange(S, dtype=np.int64)       # the sample's index in the stream
        self.cols = np.arange(S)
        self.steps = np.arange(K)[:, None]


def _look(R: np.ndarray, Fn: np.ndarray, met: np.ndarray, st: _Slots, max_iter: int, done_code: int,
          min_iter: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One check of a window of K passes, on the host: each slot's first stop and its status
    there, the pass holding its answer (`sel`: where its criterion held, else its best iterate
    up to the stop), whether that beats its best so far, its iteration count, and which slots
    stop. The same rules, on the same float32/64 numbers, as `solve`'s look."""
    K = R.shape[0]
    cols, age, active = st.cols, st.age, st.active
    fresh = age == 0                                      # samples that started this window
    if fresh.any():   # (their divergence limit, from their first pass)
        np.copyto(st.limit, limit_np(R[0], Fn[0], st.floor), where=fresh)
    if min_iter > 1:   # (no stop by the criterion before min_iter evaluations)
        met = met & (age + 1 + st.steps >= min_iter)
    first, codes = first_stops(R, met, st.limit, max_iter - 1 - age, done_code)
    sel, better = window_answers(R, first, codes == done_code, st.best_r)   # (nan for a new sample)
    better &= active
    np.copyto(st.best_r, R[sel, cols], where=better)
    its = age + 1 + first                                 # evaluations at the stop
    st.age = age + K
    return sel, better, codes, its, (codes >= 0) & active


class _Engine:
    """A stream's options, validated when `stream(...)` is called (not at the first `next()`)."""

    def __init__(self, f: Callable[..., Any], inputs: Iterable[Any], options: Dict[str, Any]) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable as f(z, x); got {type(f).__name__}.")
        own = {k: options.pop(k) for k in list(options) if k in ENGINE_DEFAULTS}
        own = {**ENGINE_DEFAULTS, **own}
        self.opts = Options.make("stream", STREAM_DEFAULTS, options)
        if not getattr(self.opts.solver, "per_row", False):
            raise TypeError(
                f"stream: solver {self.opts.solver!r} cannot restart single rows (no `per_row = True`); "
                f"use a built-in solver ('fixed_point', 'anderson', 'broyden')."
            )
        self.slots = as_int("slots", own["slots"])
        self.compile = as_bool("compile", own["compile"])
        z0 = own["z0"]
        if z0 is not None and not callable(z0):
            _start_rows(z0, None, 1)   # (one state row: checked now)
        self.f, self.z0, self.rows = f, z0, _Rows(inputs)

    def chunks(self) -> Iterator[Tuple[Finished, StateLayout]]:
        """The engine: yields the results of each look as one record (rows: stream indices)."""
        f, z0, rows, opts, S = self.f, self.z0, self.rows, self.opts, self.slots
        x_first, n0 = rows.take(S)
        if x_first is None:
            return
        z_first = _start_rows(z0, rows.structure(x_first), n0)
        layout = StateLayout(z_first)
        round_fn = rounding(layout.dtype, layout.work_dtype)
        yield from _SlotLoop(layout.wrap(f, True), layout, rows, z0, x_first, z_first, n0, S, opts, round_fn,
                             self.compile).run()


class _SlotLoop:
    """The slots' passes and looks (see the module docstring): `run` alternates K passes at a
    fixed shape (`passes`), the host's look at them (`look`), and the refill of the slots whose
    sample was emitted (`refill`)."""

    def __init__(self, fn: Callable[..., Any], layout: StateLayout, rows: "_Rows", z0: Any, x_first: List[Tensor],
                 z_first: Any, n0: int, S: int, opts: Options, round_fn: Any, compile: bool) -> None:
        self.fn, self.layout, self.rows, self.z0, self.S = fn, layout, rows, z0, S
        self.rule, self.solver, self.max_iter, self.min_iter = opts.rule, opts.solver, opts.max_iter, opts.min_iter
        self.K = K = opts.check_every or DEFAULT_CHECK_EVERY
        self.round_fn = round_fn
        self.dev = dev = layout.device
        wdt = layout.work_dtype
        self.hint = f" (It must treat the {S} slots independently.)"
        # ---- slot buffers: when fewer than S inputs exist, idle slots copy row 0 (a valid row)
        fill = torch.arange(S, device=dev).clamp_max_(n0 - 1) if n0 < S else None
        self.x_leaves = [_private(t if fill is None else t.index_select(0, fill.to(t.device)), dev) for t in x_first]
        self.x_slots = rows.structure(self.x_leaves)          # (its leaves are written in place)
        z = layout.pack(z_first).detach().clone()
        self.z = z if fill is None else z.index_select(0, fill)
        self.st = _Slots(S, K, n0, np.dtype(NUMPY[wdt]), state_floor(z[0].numel(), self.rule.norm))
        # one state row shared by every sample: its rows for a refill, made once
        self.fixed_start = None if z0 is None or callable(z0) else layout.pack(_start_rows(z0, None, S))
        self.next_index = n0
        self.criterion = None if opts.criterion is None else PackedCriterion(opts.criterion, layout.unpack)
        self.cstate = self.criterion.init(self.z) if self.criterion is not None else None
        self.done_code = opts.done_code
        # ---- one store of iterates: two rings of K passes (windows alternate between them, so
        # the previous window's iterates survive the next look) and one row per slot for a best
        # iterate that is older than that. Where each slot's answer lives is tracked on the host
        # (`best_at`), so a sample whose residual keeps falling is never copied. Plain
        # iteration's next iterate is f(z) itself, so its window's residuals come from the ring
        # at the look, in three ops for all K passes, and a pass is f and one copy.
        self.lazy = type(self.solver) is FixedPointIteration and self.solver.damping == 1.0 and round_fn is None
        self.W = W = K + 1                                   # a ring holds passes 0..K-1 and, lazily, z_K
        shape = tuple(z.shape[1:])
        self.store = z.new_empty(((2 * W + 1) * S,) + shape)
        self.saved = 2 * W * S                               # first row of the per-slot best rows
        self.ring_z = self.store[:self.saved].view((2, W, S) + shape)
        self.best_at = np.zeros(S, dtype=np.int64)           # row of `store` holding each slot's best
        self.ring_r = z.new_empty(K, S)                      # ||f(z) - z|| at the window's passes
        self.ring_f = z.new_empty(K, S)                      # ||f(z)|| at them
        self.ring_met = torch.zeros(K, S, dtype=torch.bool, device=dev)   # a criterion's verdicts
        # A criterion's halted rows return f's newest output at their stop: plain iteration has
        # it in the ring already (z_(p+1) = f(z_p)); other solvers keep f's outputs in a ring.
        self.f_store = z.new_empty((2 * K * S,) + shape) if self.criterion is not None and not self.lazy else None
        self.window_norms = _bookkeeping("window", self.rule.norm, compile)
        self.write_pass = _bookkeeping("pass", self.rule.norm, compile)
        self.state: Any = None
        self.parity = 0
        # (plain iteration with the residual rule keeps no per-row state to restart)
        self.resets = self.criterion is not None or type(self.solver) is not FixedPointIteration

    def run(self) -> Iterator[Tuple[Finished, StateLayout]]:
        """Windows of K passes until the stream is exhausted; one record per look that emits."""
        while True:
            self.passes()
            chunk, emit = self.look()
            if chunk is None:
                continue
            yield chunk, self.layout
            if not self.refill(emit):
                return

    def passes(self) -> None:
        """K passes with fixed shapes and no host sync: f, two norms, one copy, the step."""
        K, fn, x_slots, criterion, solver, round_fn = self.K, self.fn, self.x_slots, self.criterion, self.solver, \
            self.round_fn
        rr, rf, rm = self.ring_r.unbind(0), self.ring_f.unbind(0), self.ring_met.unbind(0)
        ring = self.ring_z[self.parity].unbind(0)
        f_ring = None if self.f_store is None else self.f_store.view((2, K) + tuple(self.z.shape))[self.parity]
        # each row's evaluation count per pass (an accelerated solver's slot index; a restart is
        # told by `reset` at the refill; plain iteration has no use for it)
        needs_k = type(solver) is not FixedPointIteration
        ks = torch.from_numpy(self.st.age + self.st.steps).to(self.dev).unbind(0) if needs_k else range(K)
        z, state, cstate = self.z, self.state, self.cstate
        for p in range(K):
            if p == 0:   # (an f that writes into its input does so at every call: one check a window)
                before = version(z)
                fz = check_step(fn(z, x_slots), z, "in stream", self.hint)
                check_untouched((before,), (z,))
            else:
                fz = check_step(fn(z, x_slots), z, "in stream", self.hint)
            if self.lazy:
                ring[p].copy_(z)
                g = None
            else:
                g = self.write_pass(z, fz, ring[p], rr[p], rf[p])
            if criterion is not None:
                met, cstate = criterion(z, fz, cstate)
                rm[p].copy_(met)
                if f_ring is not None:
                    f_ring[p].copy_(fz)
            if state is None:
                state = solver.init(z, fz, g)
            z, state = solver.step(state, z, fz, g, ks[p])
            if round_fn is not None:
                z = round_fn(z)
        if self.lazy:
            ring[K].copy_(z)
        self.z, self.state, self.cstate = z, state, cstate

    def look(self) -> Tuple[Optional[Finished], np.ndarray]:
        """The host's look at the window: statuses, the best iterates kept, the emitted answers."""
        st, K, W, S, dev, parity = self.st, self.K, self.W, self.S, self.dev, self.parity
        r_t, f_t = self.ring_r, self.ring_f
        if self.lazy:
            r_t, f_t = self.window_norms(self.ring_z[parity])
        met_t = self.ring_met if self.criterion is not None else self.rule.excess(r_t, f_t) <= 0
        R, Fn, M = host_arrays(r_t, f_t, met_t)
        sel, better, codes, its, stops = _look(R, Fn, M, st, self.max_iter, self.done_code, self.min_iter)
        # a best iterate in the previous window's ring that this window did not beat is saved
        # before the next window overwrites that ring (emitted samples are read out first)
        best_at, store = self.best_at, self.store
        old = (best_at // (W * S) == parity ^ 1) & ~better & ~stops & st.active
        np.copyto(best_at, parity * W * S + sel * S + st.cols, where=better)
        if old.any():
            keep = np.flatnonzero(old)
            store.index_copy_(0, index_tensor(self.saved + keep, dev),
                              store.index_select(0, index_tensor(best_at[keep], dev)))
            best_at[keep] = self.saved + keep
        self.parity ^= 1
        emit = np.flatnonzero(stops)
        if not emit.size:
            return None, emit
        answers = store.index_select(0, index_tensor(best_at[emit], dev))
        halted = np.flatnonzero(codes[emit] == self.done_code) if self.criterion is not None else ()
        if len(halted):   # (the newest state, f's output at the stop pass)
            cols = emit[halted]
            if self.f_store is None:
                at, source = parity * W * S + (sel[cols] + 1) * S + cols, store
            else:
                at, source = parity * K * S + sel[cols] * S + cols, self.f_store
            answers[index_tensor(halted, dev)] = source.index_select(0, index_tensor(at, dev))
        return Finished(st.sample[emit], answers, st.best_r[emit], its[emit], codes[emit]), emit

    def refill(self, emit: np.ndarray) -> bool:
        """The emitted slots take the next inputs (idle slots copy a live row); False when no
        slot is live any more."""
        self.restart(emit)
        x_new, n_new = self.rows.take(emit.size)
        if n_new:
            z_new = self.fixed_start[:n_new] if self.fixed_start is not None else \
                self.layout.pack(_start_rows(self.z0, self.rows.structure(x_new), n_new))
            self.place(emit[:n_new], x_new, z_new)
            self.st.sample[emit[:n_new]] = np.arange(self.next_index, self.next_index + n_new)
            self.next_index += n_new
        return self.retire(emit[n_new:])

    def restart(self, emit: np.ndarray) -> None:
        """The solver's and the criterion's one reset hook: these slots start afresh."""
        if self.resets and emit.size:
            fresh = torch.zeros(self.S, dtype=torch.bool, device=self.dev).index_fill_(0, index_tensor(emit, self.dev),
                                                                                     True)
            if self.state is not None and hasattr(self.solver, "reset"):
                self.state = self.solver.reset(self.state, fresh)
            if self.criterion is not None:
                self.cstate = self.criterion.reset(self.cstate, fresh)

    def place(self, slots: np.ndarray, x_new: List[Tensor], z_new: Tensor) -> None:
        """New samples into these slots: their input leaves and (packed) starting states."""
        slot = index_tensor(slots, self.dev)
        for buf, t in zip(self.x_leaves, x_new):
            buf.index_copy_(0, slot, t if t.device == buf.device else t.to(buf.device))
        self.z = self.z.index_copy(0, slot, z_new)
        self.st.age[slots] = 0
        self.st.best_r[slots] = np.nan
        self.st.active[slots] = True

    def retire(self, idle: np.ndarray) -> bool:
        """These slots hold no sample any more: they copy a live row (f sees valid data);
        False when no slot is live."""
        if not idle.size:
            return True
        st = self.st
        st.active[idle] = False
        live = np.flatnonzero(st.active)
        if live.size == 0:
            return False
        idle_t = index_tensor(idle, self.dev)
        src = index_tensor(live[:1], self.dev).expand(idle_t.numel())
        for buf in self.x_leaves:
            buf.index_copy_(0, idle_t, buf.index_select(0, src))
        self.z = self.z.index_copy(0, idle_t, self.z.index_select(0, src))
        st.age[idle] = 0
        return True


def _record_pass(z: Tensor, fz: Tensor, z_out: Tensor, r_out: Tensor, f_out: Tensor, norm: str) -> Tensor:
    """A pass's bookkeeping: its iterate into the ring, ||f(z) - z|| and ||f(z)||; returns g."""
    g = fz - z
    sample_norm(g, norm, out=r_out)
    sample_norm(fz, norm, out=f_out)
    z_out.copy_(z)
    return g


def _window_norms(ring: Tensor, norm: str) -> Tuple[Tensor, Tensor]:
    """Plain iteration's residual norms [K, S] for a whole window from its iterates z_0..z_K
    (f(z_p) = z_(p+1)): the same numbers as pass by pass, in three ops."""
    return sample_norm(ring[1:] - ring[:-1], norm, start=2), sample_norm(ring[1:], norm, start=2)


_COMPILED: dict = {}   # (what, norm) -> the torch.compile'd bookkeeping, made once per process


def _bookkeeping(what: str, norm: str, compile: bool) -> Callable[..., Any]:
    """`_record_pass` ("pass") or `_window_norms` ("window") for this norm, compiled with
    torch.compile when asked (once per process; dynamo recompiles per shape)."""
    if what == "pass":
        fn: Callable[..., Any] = lambda z, fz, z_out, r_out, f_out: _record_pass(z, fz, z_out, r_out, f_out, norm)  # noqa: E731
    else:
        fn = lambda ring: _window_norms(ring, norm)  # noqa: E731
    if not compile:
        return fn
    if (what, norm) not in _COMPILED:
        _COMPILED[what, norm] = torch.compile(fn, dynamic=False)
    return _COMPILED[what, norm]


def _private(t: Tensor, device: torch.device) -> Tensor:
    """A private, contiguous copy of an input field on the state's device (written in place)."""
    return t.to(device=device).clone(memory_format=torch.contiguous_format)


def stream(f: Callable[..., Any], inputs: Iterable[Any], *, slots: int = 64, z0: Any = None,
           solver: Any = "anderson", atol: float = 0.0, rtol: float = 1e-4, max_iter: int = 50,
           norm: str = "l2", criterion: Any = None, check_every: Optional[int] = None,
           min_iter: Optional[int] = None, compile: bool = False) -> Iterator[StreamResult]:
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
        min_iter: None, or the fewest evaluations before a sample may stop by its criterion.
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
    engine = _Engine(f, inputs, dict(slots=slots, z0=z0, solver=solver, atol=atol, rtol=rtol, max_iter=max_iter,
                                     norm=norm, criterion=criterion, check_every=check_every, min_iter=min_iter,
                                     compile=compile))
    return _results(engine)


@torch.no_grad()
def _results(engine: _Engine) -> Iterator[StreamResult]:
    """One StreamResult per sample, as the engine emits them (no gradients)."""
    for chunk, layout in engine.chunks():
        zs = layout.unpack(chunk.z)
        rows = zip(chunk.rows.tolist(), chunk.iterations.tolist(), chunk.residual.tolist(), chunk.status.tolist())
        for i, (idx, it, r, st) in enumerate(rows):
            yield StreamResult(idx, map_tensors(lambda t: t[i], zs), it, r, Status(st))


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
    engine = _Engine(f, inputs, dict(options))
    engine.f = counted = _Counted(f)
    chunks: List[Finished] = []
    layout: Optional[StateLayout] = None
    with torch.no_grad():
        for chunk, layout in engine.chunks():
            chunks.append(chunk)
    if layout is None:   # an empty stream: an empty Solution (z empty, in the state's structure if known)
        empty = torch.zeros(0, dtype=torch.int64)
        z0, x = engine.z0, engine.rows.template
        if z0 is not None and not callable(z0):
            z = map_tensors(lambda t: t[:0], z0)
        elif z0 is None and isinstance(x, Tensor):
            z = torch.zeros_like(x[:0])
        else:
            z = torch.zeros(0)
        return solution(z, empty.double(), empty, empty.clone(), 0)
    z, r, it, status = assemble(chunks, chunks[0].z.device)
    return solution(layout.unpack(z), r, it, status, counted.calls * engine.slots)


class _Counted:
    """f, counting its calls (solve_stream's `evaluations`: slots times passes)."""

    def __init__(self, f: Callable[..., Any]) -> None:
        self.f, self.calls = f, 0

    def __call__(self, z: Any, x: Any) -> Any:
        self.calls += 1
        return self.f(z, x)


__all__ = ["stream", "solve_stream", "StreamResult"]
