"""The protocol every solver follows: make a state, then propose the next iterate.

A solver never owns a loop, a tolerance test or any bookkeeping: `fpsolve._loop.iterate`
does all of that and calls `init` once and `step` once per evaluation of f. Every tensor in
the state is batch-first over the *active* samples, so the loop can drop halted rows from it
with `index_select` (see `compact`); other entries (ints) pass through unchanged. A solver
may define its own `compact(state, keep)` when it can do better than copying every buffer.
"""
from __future__ import annotations

from typing import Any, List, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
from torch import Tensor

State = Tuple[Any, ...]


@runtime_checkable
class Solver(Protocol):
    """The protocol of a solver: `init(z, fz, g) -> state`; `step(state, z, fz, g, k) -> (next z, state)`.

    A solver only proposes the next iterate: fpsolve's one loop owns halting, the best
    iterate, statuses and the trace, and calls `init` once and `step` once per evaluation of
    f. Every tensor of a state is batch-first over the active rows (the loop drops halted rows
    with `index_select`, or with the solver's own `compact(state, keep)` if it has one).
    `z` is the current iterate `[b, ...]`, `fz = f(z)`, `g = fz - z`, and `k` counts the
    evaluations already made for these rows, minus one (0 at the first step). Steps run under
    `torch.no_grad()` (with grad for `Unroll`); a solver may update its own state buffers in
    place when autograd is not recording.

    Per-row stepping (`fpsolve.stream`, fixed shapes): `k` may also be an int64 tensor `[b]`
    of per-row counts (`k[i] == 0` for a row that holds a new sample). A new sample's step must
    ignore the row's history exactly as if `init` had been called for that row alone: the
    built-in solvers learn which rows restart from their `reset(state, fresh)` hook, which
    `stream` calls at a refill, as it calls a criterion's `reset` (a solver without `reset`
    reads `k == 0`). Such a step does
    no host sync and has no data-dependent shape (it may run under torch.compile), and each
    row follows the trajectory of the int-k path. A solver that supports this says so with
    the class attribute `per_row = True` (optional, so not a protocol member: a solver
    without it is still a Solver); `stream` rejects one without it.

    Example:
        ```python
        class HalfStep:   # z <- z + (f(z) - z) / 2, a user-written solver
            def init(self, z, fz, g):
                return ()
            def step(self, state, z, fz, g, k):
                return z + 0.5 * g, state
        assert isinstance(HalfStep(), fpsolve.Solver)
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), torch.ones(2, 3), solver=HalfStep())
        assert bool(sol.converged.all())
        ```
    """

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        """Make the solver's state for the rows of z, after the first evaluation of f.

        Args:
            z: The first iterate of the active rows, `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.

        Returns:
            A tuple of batch-first tensors `[b, ...]` (other entries pass through unchanged).
        """
        ...

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int) -> Tuple[Tensor, State]:
        """Propose the next iterate of every row from the current one.

        Args:
            state: The state from `init` or the previous `step`, rows matching z.
            z: The current iterate `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.
            k: Evaluations already made for these rows, minus one (0 at the first step); or
                an int64 tensor `[b]` of per-row counts (`fpsolve.stream`), 0 marking a row
                that holds a new sample.

        Returns:
            The next iterate (shaped like z) and the updated state.
        """
        ...


def restart_rows(state: State, fresh: Tensor) -> State:
    """A per-row state (last entry: the rows to restart at their next per-row step) with the
    rows `fresh` marked too; before any per-row step every row starts afresh anyway."""
    *rest, pending = state
    if not isinstance(pending, Tensor):
        return state
    return (*rest, pending | fresh)


def restarting(pending: Any, k: Tensor) -> Tensor:
    """The rows a per-row step restarts: those marked by `reset`, and those whose count k is 0
    (every row at the first per-row step)."""
    if not isinstance(pending, Tensor):
        return torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
    return pending | (k == 0)


def compact(state: State, index: Tensor) -> State:
    """Keep the rows `index` of every tensor in a solver state (other entries unchanged)."""
    return tuple(s.index_select(0, index) if isinstance(s, Tensor) else s for s in state)


#: buffers at least this large are compacted in place (in chunks); smaller ones by one gather
IN_PLACE_BYTES = 8 << 20


def keep_rows(buf: Tensor, keep: Tensor, sorted_keep: bool) -> Tensor:
    """buf.index_select(0, keep), in place when it is safe and the buffer is large: the kept rows
    move to the front of buf through a temporary of an eighth of it, and buf[:len(keep)] is returned.

    (A copy would hold the old and the new state at once: twice the solver's memory at every
    compaction.) Needs keep ascending (`sorted_keep`, checked once per compaction by the caller)
    and autograd not recording; then row keep[i] >= i, so a chunk never overwrites a source
    row of a later chunk. The storage is not shrunk: the memory is held until the solve ends.
    """
    if not sorted_keep or torch.is_grad_enabled() or buf.requires_grad or \
            buf.numel() * buf.element_size() < IN_PLACE_BYTES:
        return buf.index_select(0, keep)   # (a small buffer: one op; the copy costs little memory)
    n = keep.shape[0]
    step = max(1, -(-n // 8))
    for i in range(0, n, step):
        j = min(n, i + step)
        buf.narrow(0, i, j - i).copy_(buf.index_select(0, keep[i:j]))
    return buf.narrow(0, 0, n)


def is_ascending(keep: Tensor) -> bool:
    """Whether the row indices increase strictly (one host sync; compaction is the slow path)."""
    return keep.shape[0] < 2 or bool((keep[1:] > keep[:-1]).all())


def check_positive(name: str, value: object, *, integer: bool = False, at_most: float | None = None) -> None:
    """Raise a clear error unless value is a positive number (an int when integer=True)."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
    if ok and at_most is not None:
        ok = value <= at_most
    if not ok:
        want = "a positive integer" if integer else "a positive number"
        if at_most is not None:
            want += f" no larger than {at_most}"
        raise ValueError(f"{name} must be {want}; got {value!r}.")


def remember(recent: Tensor, r: Tensor, reject: Tensor) -> Tensor:
    """recent [b, w], oldest first, with r appended (and the oldest dropped) where not reject."""
    return torch.where(reject.unsqueeze(1), recent, torch.cat((recent[:, 1:], r.unsqueeze(1)), 1))


def flat(t: Tensor) -> Tensor:
    """[b, ...] -> [b, n] (no op for the common 2-D state)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def write_slot(buf: Tensor, index: Tuple[Any, ...], value: Tensor) -> Tensor:
    """buf[index] = value, in place; out of place (a copy) when autograd records the step.

    Unrolled differentiation (`fpsolve.Unroll`) runs the solvers with grad enabled: tensors
    saved for backward must then never be overwritten.
    """
    if torch.is_grad_enabled() and (value.requires_grad or buf.requires_grad):
        buf = buf.clone()
    buf[index] = value
    return buf


def recorded_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """`torch.linalg.solve_ex(system, rhs)[0].nan_to_num(0, 0, 0)` as autograd records it
    (`fpsolve.Unroll`): the same values, bit for bit, and a backward that is finite.

    The backward of a solve goes through the inverse of the matrix: for a singular one (a
    zero history column, when a sample's residual stops changing) it is NaN even where the
    incoming gradient is zero, and a mask applied after the solve does not help. So the
    degenerate samples (those whose solution is not finite) are found first, without
    autograd; their matrices are replaced by the identity for the recorded solve, and their
    (constant) solution is put back by a mask: the other samples are solved exactly as
    before, the degenerate ones send no gradient back.
    """
    with torch.no_grad():
        plain, info = torch.linalg.solve_ex(system, rhs)
        bad = (info != 0) | ~torch.isfinite(plain).flatten(1).all(1)
        bad = bad.view(-1, *(1,) * (system.dim() - 1))
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    solved = torch.linalg.solve_ex(torch.where(bad, eye, system), torch.where(bad, 0.0, rhs))[0]
    return torch.where(bad, plain.nan_to_num_(0.0, 0.0, 0.0), solved)


def recorded_reciprocal(denom: Tensor, ok: Tensor) -> Tensor:
    """`torch.where(ok, 1 / denom, 0)` as autograd records it: the same values, bit for bit,
    and a backward that is never NaN.

    `torch.where(ok, denom.reciprocal(), 0)` sends back 0 · (-1 / denom²) where not ok: NaN
    where denom is 0, and also where 1 / denom² overflows (|denom| < 5e-20 in float32), even
    for a step whose gradient is 0. So the recorded reciprocal is taken of a safe
    denominator, only where it is ok and its derivative -1 / denom² is finite; elsewhere the
    value is a constant (0, or 1 / denom computed without autograd), whose backward is 0.
    """
    limit = 2.0 * float(torch.finfo(denom.dtype).max) ** -0.5
    big = ok & (denom.detach().abs() >= limit)
    with torch.no_grad():
        small = torch.where(ok, denom.reciprocal(), 0.0)
    return torch.where(big, torch.where(big, denom, 1.0).reciprocal(), small)


def to_host(*ts: Tensor) -> List[np.ndarray]:
    """Small per-sample tensors as numpy arrays, for a step's host-side decisions.

    On a CPU they are views (no op, no copy); elsewhere one transfer (a cat and a copy: the
    step's one sync). A solver whose decisions need a sync anyway brings the numbers to the
    host once and decides there in numpy, instead of launching a reduction, a comparison and
    a `.item()` per decision. numpy compares and rounds as torch does (IEEE, same dtype:
    float32 stays float32); bfloat16 has no numpy type and goes as float32.
    """
    ts = tuple(t.detach() for t in ts)
    if ts[0].dtype == torch.bfloat16:
        ts = tuple(t.float() for t in ts)
    if ts[0].device.type == "cpu":
        return [_numpy(t) for t in ts]
    flat_all = torch.cat([t.reshape(-1) for t in ts]).cpu().numpy()
    out, at = [], 0
    for t in ts:
        out.append(flat_all[at:at + t.numel()].reshape(tuple(t.shape)))
        at += t.numel()
    return out


def _numpy(t: Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array: a view, or a copy for a tensor without storage (under
    torch.func transforms)."""
    try:
        return t.numpy()
    except RuntimeError:
        return np.array(t.tolist(), dtype=np.dtype(str(t.dtype).replace("torch.", "")))


def shift_in(recent: np.ndarray, r: np.ndarray) -> np.ndarray:
    """recent [b, w] (oldest first, on the host) with r appended and the oldest dropped."""
    return np.concatenate((recent[:, 1:], r[:, None]), 1)


def compact_rest(entries: Any, keep: Tensor) -> List[Any]:
    """The rows `keep` of each per-sample entry: tensors on the device, numpy arrays on the
    host (a solver's host-side bookkeeping); other entries unchanged."""
    keep_np = None
    out = []
    for t in entries:
        if isinstance(t, Tensor):
            t = t.index_select(0, keep)
        elif isinstance(t, np.ndarray):
            if keep_np is None:
                keep_np = _numpy(keep.cpu())
            t = t[keep_np]
        out.append(t)
    return out
