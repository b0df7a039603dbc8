"""`fpsolve.stream` / `solve_stream`: continuous batching of fixed-point solves at a fixed shape.

`slots` rows are in flight. Every pass evaluates f on exactly `[slots, ...]` and runs the
solver step, the residual norms and the criterion as tensor ops, with no host sync and no
data-dependent shape (so a compiled f, or CUDA graphs, never recompile). The last
`check_every` iterates and residuals of every slot are kept in a small ring; every
`check_every` passes the host looks once: each slot whose sample stopped inside the window is
emitted from the ring at the exact pass where it stopped (its iteration count is exact; only
the passes after that were wasted) and the slot takes the next pending input.

Per sample the result is what `solve` gives that sample alone: the iterate where its
criterion first held (CONVERGED / HALTED), or its best iterate when the budget ran out
(MAX_ITER) or it blew up (DIVERGED); a refilled slot's solver history starts fresh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._criteria import make_criterion
from ._loop import Halt, _limit
from ._solution import Solution, Status
from ._checks import as_bool, as_tolerances
from ._solve import DEFAULT_CHECK_EVERY, NORMS, _check_choice, check_max_iter, make_solver
from ._tree import StateLayout, select_rows, tensors_in



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
    """Results emitted at one check: stream indices and batch-first tensors."""

    index: Tensor
    z: Tensor         # loop layout [n, ...]
    iterations: Tensor
    residual: Tensor
    status: Tensor


class _Rows:
    """The input stream as rows: pulls batches from `inputs` and hands out the next n rows."""

    def __init__(self, inputs: Iterable[Any]) -> None:
        if isinstance(inputs, (Tensor, dict)) or inputs is None or not hasattr(inputs, "__iter__"):
            raise TypeError(
                "inputs must be an iterable of batches (e.g. a list of tensors or a DataLoader); "
                f"got {type(inputs).__name__}. To stream one batch, pass [x]."
            )
        self.it = iter(inputs)
        self.parts: List[Any] = []   # pending batches, the first one from row `self.start`
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
            self.row_spec = spec
        elif spec != self.row_spec:
            raise ValueError(
                f"inputs: batch {self.batches} has rows of shape/dtype "
                f"{[(tuple(s), d) for s, d in spec]}, but the first batch had "
                f"{[(tuple(s), d) for s, d in self.row_spec]}: every row of a stream must have the "
                f"same shape (f sees a fixed [slots, ...] batch). Pad, or stream each shape separately."
            )
        if b:
            self.parts.append(batch)
            self.pending += b
        return True

    def take(self, n: int) -> Tuple[Optional[Any], int]:
        """Up to n next rows, as one batch (None when the stream is exhausted)."""
        while self.pending < n and not self.done:
            self._pull()
        n = min(n, self.pending)
        if n == 0:
            return None, 0
        pieces, need = [], n
        while need:
            first = self.parts[0]
            size = _batch_size(first) - self.start
            m = min(need, size)
            pieces.append(_slice_rows(first, self.start, self.start + m))
            need -= m
            if m == size:
                self.parts.pop(0)
                self.start = 0
            else:
                self.start += m
        self.pending -= n
        return (pieces[0] if len(pieces) == 1 else _cat_rows(pieces)), n


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


def _batch_size(batch: Any) -> int:
    return tensors_in(batch)[0].shape[0]


def _slice_rows(batch: Any, a: int, b: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[a:b]
    if isinstance(batch, dict):
        return {k: _slice_rows(v, a, b) for k, v in batch.items()}
    return type(batch)(_slice_rows(v, a, b) for v in batch)


def _cat_rows(pieces: List[Any]) -> Any:
    first = pieces[0]
    if isinstance(first, Tensor):
        return torch.cat(pieces)
    if isinstance(first, dict):
        return {k: _cat_rows([p[k] for p in pieces]) for k in first}
    return type(first)(_cat_rows([p[i] for p in pieces]) for i in range(len(first)))


def _write_rows(dst: Any, index: Tensor, src: Any) -> None:
    """dst[index] = src for every tensor of a structure, in place (fixed shapes)."""
    if isinstance(dst, Tensor):
        dst.index_copy_(0, index, src if src.device == dst.device else src.to(dst.device))
    elif isinstance(dst, dict):
        for k in dst:
            _write_rows(dst[k], index, src[k])
    else:
        for d, s in zip(dst, src):
            _write_rows(d, index, s)


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


def _window(ring_r: Tensor, ring_f: Tensor, ring_met: Optional[Tensor], flat_z: Tensor, limit: Tensor,
            age: Tensor, ages: Tensor, best_z: Tensor, best_r: Tensor, active: Tensor,
            steps: Tensor, slot_ids: Tensor, neg_rtol: Tensor, atol: float, floor: float, max_iter: int,
            done_code: int) -> Tuple[Tensor, ...]:
    """The fixed-shape part of a check (no sync): per-pass statuses of the window, each slot's
    first stop, its best iterate merged, and the slots to emit. Compilable (compile=True)."""
    K, S = ring_r.shape
    fresh = age == 0                                             # samples that started this window
    limit = torch.where(fresh, _limit(ring_r[0], ring_f[0], floor), limit)
    met = (torch.addcmul(ring_r, ring_f, neg_rtol) <= atol) if ring_met is None else ring_met
    bad = ~(ring_r <= limit)                                   # non-finite, or blown up
    # status per pass (-1: runs on); a sample stops at its first pass with a status
    code = torch.where(met, done_code, torch.where(ages >= max_iter - 1, int(Status.MAX_ITER), -1))
    code = torch.where(bad, int(Status.DIVERGED), code)
    first_stop = torch.where(code >= 0, steps, K).amin(dim=0)    # K: none in this window
    # Each sample's answer so far: the pass where its criterion held, else its best (smallest
    # residual over the passes up to its stop, merged with earlier windows' best).
    at_stop = code.gather(0, first_stop.clamp(max=K - 1).unsqueeze(0)).squeeze(0)
    at_stop = torch.where(first_stop < K, at_stop, -1)             # status at the first stop
    done = at_stop == done_code
    w_r, w_best = torch.where(steps <= first_stop, ring_r.nan_to_num(math.inf), math.inf).min(dim=0)
    sel = torch.where(done, first_stop, w_best)
    better = (w_r < best_r) | torch.isnan(best_r) | done | fresh
    pick = flat_z.index_select(0, sel * S + slot_ids).view_as(best_z)
    best_z = torch.where(better.view((-1,) + (1,) * (best_z.ndim - 1)), pick, best_z)
    best_r = torch.where(better, ring_r.gather(0, sel.unsqueeze(0)).squeeze(0), best_r)
    its = age + 1 + first_stop                                     # evaluations at the stop
    return limit, age + K, at_stop, its, best_z, best_r, (at_stop >= 0) & active


_compiled_window: Optional[Callable[..., Tuple[Tensor, ...]]] = None


def _stream_chunks(f: Callable[..., Any], inputs: Iterable[Any], *, slots: int, z0: Any, solver: Any,
                   atol: float, rtol: float, max_iter: int, norm: str, criterion: Any,
                   check_every: Optional[int], compile: bool = False) -> Iterator[Tuple[_Chunk, StateLayout]]:
    """The engine: yields the results of each check as one chunk (tensors, loop layout)."""
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

    global _compiled_window
    compile = as_bool("compile", compile)
    if compile and _compiled_window is None:
        _compiled_window = torch.compile(_window, dynamic=False)
    window = _compiled_window if compile else _window
    rows = _Rows(inputs)
    x_first, n0 = rows.take(slots)
    if x_first is None:
        return
    S = slots
    z_first = _start_rows(z0, x_first, n0)
    layout = StateLayout(z_first if isinstance(z_first, Tensor) else tuple(z_first))
    dev, wdt = layout.device, layout.work_dtype
    round_fn = None
    if layout.work_dtype != layout.dtype:
        low = layout.dtype
        round_fn = lambda t: t.to(low).to(t.dtype)  # noqa: E731

    # Slot buffers: when fewer than S inputs exist, idle slots copy row 0 (a valid row).
    fill = torch.arange(S, device=dev).clamp_max_(n0 - 1) if n0 < S else None
    x_slots = _structure_clone(x_first if fill is None else select_rows(x_first, fill.to(_dev_of(x_first))), dev)
    z = layout.pack(z_first).detach().clone()
    if fill is not None:
        z = z.index_select(0, fill)
    sample = torch.arange(S, device=dev)         # stream index of each slot's sample
    active = torch.arange(S, device=dev) < n0    # slot holds a sample not yet emitted
    next_index = n0
    age = torch.zeros(S, dtype=torch.int64, device=dev)

    fn = layout.wrap(f, True)
    halt = None if other is None else Halt(other, layout.unpack)
    hstate = halt.init(z) if halt is not None else None
    dims = tuple(range(1, z.ndim))
    floor = math.sqrt(z[0].numel()) if rule.norm == "l2" else 1.0
    done_code = int(Status.CONVERGED) if other is None else int(Status.HALTED)
    K = check_every
    ring_z = z.new_empty((K,) + tuple(z.shape))     # the last K iterates of every slot
    ring_r = z.new_empty(K, S)                       # ||f(z) - z|| at them
    ring_f = z.new_empty(K, S)                       # ||f(z)|| at them
    ring_met = torch.zeros(K, S, dtype=torch.bool, device=dev)   # a criterion object's verdicts
    flat_z = ring_z.view(K * S, -1)                  # (row p*S + i: pass p of slot i)
    rz, rr, rf, rm = ring_z.unbind(0), ring_r.unbind(0), ring_f.unbind(0), ring_met.unbind(0)
    # Each slot's best iterate so far (nan: none yet), merged from the ring at every check.
    best_z, best_r = z.clone(), torch.full((S,), math.nan, dtype=wdt, device=dev)
    limit = torch.empty(S, dtype=wdt, device=dev)
    neg_rtol = torch.tensor(-rule.rtol, dtype=wdt, device=dev)
    state = None
    steps = torch.arange(K, device=dev).view(K, 1)
    slot_ids = torch.arange(S, device=dev)
    codes_dtype = dict(dtype=torch.int64, device=dev)
    if rule.norm == "l2":
        norm_into = lambda t, out: torch.linalg.vector_norm(t, dim=dims, out=out)  # noqa: E731
    else:
        norm_into = lambda t, out: torch.amax(t.abs(), dim=dims, out=out)  # noqa: E731

    while True:
        # ---- K passes with fixed shapes and no host sync: f, two norms, one copy, the step --
        ages = age.unsqueeze(0) + steps                            # [K, S]: k of each pass
        ks = ages.unbind(0)
        for p in range(K):
            fz = _call(fn, z, x_slots, S)
            g = fz - z
            norm_into(g, rr[p])
            norm_into(fz, rf[p])
            rz[p].copy_(z)
            if halt is not None:
                met, hstate = halt(z, fz, other.reset(hstate, ks[p] == 0))
                rm[p].copy_(met)
            if state is None:
                state = solver_obj.init(z, fz, g)
            z, state = solver_obj.step(state, z, fz, g, ks[p])
            if round_fn is not None:
                z = round_fn(z)
        # ---- the check: statuses of the window, emit what stopped, refill the slots -------
        limit, age, codes_now, its_now, best_z, best_r, stops = window(
            ring_r, ring_f, ring_met if halt is not None else None, flat_z, limit, age, ages,
            best_z, best_r, active, steps, slot_ids, neg_rtol, rule.atol, floor, max_iter, done_code)
        emit_rows = stops.nonzero().squeeze(1)                      # the one host sync of a check
        n_emit = emit_rows.numel()
        if n_emit:
            codes = codes_now.index_select(0, emit_rows)
            out_z, out_r = best_z.index_select(0, emit_rows), best_r.index_select(0, emit_rows)
            its = its_now.index_select(0, emit_rows)
            yield _Chunk(sample.index_select(0, emit_rows), out_z, its, out_r, codes), layout
            # Refill the emitted slots with the next inputs (idle slots copy a live row).
            x_new, n_new = rows.take(n_emit)
            if n_new:
                slot = emit_rows[:n_new]
                _write_rows(x_slots, slot, x_new)
                z_new = layout.pack(_start_rows(z0, x_new, n_new))
                z = z.index_copy(0, slot, z_new)
                age = age.index_fill(0, slot, 0)
                sample = sample.index_copy(0, slot, torch.arange(next_index, next_index + n_new, **codes_dtype))
                next_index += n_new
            if n_new < n_emit:
                active.index_fill_(0, emit_rows[n_new:], False)
                live = active.nonzero().squeeze(1)
                if live.numel() == 0:
                    return
                idle = emit_rows[n_new:]
                src = live[:1].expand(idle.numel())
                _write_rows(x_slots, idle, select_rows(x_slots, src))
                z = z.index_copy(0, idle, z.index_select(0, src))
                age = age.index_fill(0, idle, 0)


def _dev_of(x: Any) -> torch.device:
    return tensors_in(x)[0].device


def _structure_clone(x: Any, device: torch.device) -> Any:
    """A private, contiguous copy of x on the state's device (the slots are written in place)."""
    if isinstance(x, Tensor):
        return x.to(device=device).clone(memory_format=torch.contiguous_format)
    if isinstance(x, dict):
        return {k: _structure_clone(v, device) for k, v in x.items()}
    return type(x)(_structure_clone(v, device) for v in x)


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
        compile: True compiles the fixed-shape bookkeeping of a look with `torch.compile`
            (a few seconds once per process and shape; it pays on long streams). Compiling f
            is yours to do.

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
    order = torch.argsort(torch.cat([c.index for c in chunks]))
    cat = lambda name: torch.cat([getattr(c, name) for c in chunks]).index_select(0, order)  # noqa: E731
    status = cat("status")
    return Solution(z=layout.unpack(cat("z")), iterations=cat("iterations"), residual=cat("residual"),
                    converged=(status == int(Status.CONVERGED)) | (status == int(Status.HALTED)),
                    status=status, evaluations=calls["n"] * int(slots))


__all__ = ["stream", "solve_stream", "StreamResult", "DEFAULT_CHECK_EVERY"]
