"""Per-sample rules, one copy each: the per-sample norm, the divergence limit (torch and numpy
forms side by side), the window decisions of a look, the check of f's output, the record of
finished rows and the assembly of a `Solution` from them.

`solve`, `stream`, the implicit adjoint and `diagnose` all decide with these functions, so a
sample gets the same status, iteration count and answer whichever of them ran it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._solution import Solution, Status
from ._tree import map_tensors

#: A sample is DIVERGED when its residual is not finite, or exceeds this multiple of its
#: starting scale: max(||f(z0)-z0|| + ||f(z0)||, the norm of an all-ones sample). The floor
#: keeps a bounded map that starts near 0 (tanh(2z + 1e-9)) from being called divergent.
DIVERGENCE_FACTOR = 1e6
MAX_CODE = int(Status.MAX_ITER)
DIVERGED_CODE = int(Status.DIVERGED)

_CONSTANTS: dict = {}


def constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor (a Python float operand costs more per op than a cached tensor)."""
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:   # (a sweep over many tolerances must not grow it forever)
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


# --- norms and the divergence limit --------------------------------------------------------

def sample_norm(t: Tensor, norm: str, start: int = 1, out: Optional[Tensor] = None) -> Tensor:
    """Per-sample norm over the dimensions from `start` on: "l2" or "inf" (largest entry)."""
    dims = tuple(range(start, t.ndim))
    if norm == "l2":
        return torch.linalg.vector_norm(t, dim=dims, out=out)
    return torch.amax(t.abs(), dim=dims, out=out)


def floor(numel: int, norm: str) -> float:
    """The norm of an all-ones sample of `numel` entries: the smallest starting scale."""
    return math.sqrt(numel) if norm == "l2" else 1.0


def limit(rn: Tensor, fnorm: Tensor, low: float) -> Tensor:
    """Per sample, the residual beyond which it is DIVERGED: DIVERGENCE_FACTOR times its
    starting scale ||f(z0) - z0|| + ||f(z0)||, at least `low` (a non-finite start gives `low`,
    so such a sample is DIVERGED at once)."""
    scale = torch.nan_to_num(rn + fnorm, nan=low, posinf=low)
    return torch.clamp_min(scale, low).mul_(DIVERGENCE_FACTOR)


def limit_np(rn: np.ndarray, fnorm: np.ndarray, low: float) -> np.ndarray:
    """`limit` on the host, on the same float32/64 numbers (stream's look)."""
    scale = rn + fnorm
    dt = scale.dtype.type
    return np.where(scale < np.inf, np.fmax(scale, dt(low)), dt(low)) * dt(DIVERGENCE_FACTOR)


# --- the window decisions of a look (host, numpy) --------------------------------------------

def first_stops(R: np.ndarray, met: np.ndarray, lim: np.ndarray, budget: Any,
                done_code: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row of a window [w, b] of residual norms: its first pass with a status (w: none)
    and that status (-1: runs on). `budget`: the pass (per row, or one for all) where the
    row's budget ends (>= w: not in this window). DIVERGED (non-finite, or beyond `lim`)
    beats the criterion (`met`), which beats the budget. Used by `solve` and `stream` alike."""
    ok = R <= lim
    stop = met | ~ok
    w, cols = R.shape[0], np.arange(R.shape[1])
    first = stop.argmax(0)
    first[~stop[first, cols]] = w
    first = np.maximum(np.minimum(first, budget), 0)    # (a stream's idle slots run past it)
    at = np.minimum(first, w - 1)
    codes = np.where(~ok[at, cols], DIVERGED_CODE, np.where(met[at, cols], done_code, MAX_CODE))
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


# --- f's output, rounding ---------------------------------------------------------------------

def check_step(fz: Any, z: Tensor, where: str, hint: str = "") -> Tensor:
    """f's output at a later pass: a tensor shaped like z (the first call is checked in full
    by `StateLayout.check_output`); a clear error naming the pass otherwise."""
    if not isinstance(fz, Tensor) or fz.shape != z.shape or fz.dtype != z.dtype:
        got = f"shape {tuple(fz.shape)}, dtype {fz.dtype}" if isinstance(fz, Tensor) else type(fz).__name__
        raise ValueError(
            f"f returned {got} {where} for a state of shape {tuple(z.shape)}, dtype "
            f"{z.dtype}: f must return a state shaped like z.{hint}"
        )
    return fz


def version(t: Any) -> int:
    """A tensor's version counter (bumped by every in-place write), or -1 where none is kept
    (inference-mode tensors)."""
    try:
        return t._version
    except (RuntimeError, AttributeError):
        return -1


def check_untouched(before: Sequence[int], z: Sequence[Any]) -> None:
    """A clear error when f wrote into its input (an in-place op on z): the loop keeps earlier
    iterates by reference, so such an f would corrupt them and every status after."""
    if any(b != -1 and version(t) != b for b, t in zip(before, z)):
        raise ValueError(
            "f modified its input z in place (e.g. nn.ReLU(inplace=True) or z.add_(...) applied to "
            "z): fpsolve keeps earlier iterates by reference, so f must leave z unchanged. Use the "
            "out-of-place op (inplace=False), or clone z at the top of f."
        )


def rounding(dtype: torch.dtype, work_dtype: torch.dtype) -> Optional[Callable[[Tensor], Tensor]]:
    """For a float16/bfloat16 state solved in float32: each new iterate rounded to the user's
    precision (so statuses hold at the returned values); None otherwise."""
    if dtype == work_dtype:
        return None
    return lambda t: t.to(dtype).to(t.dtype)


# --- dead rows in a gradient graph -----------------------------------------------------------

def live_rows(status: Tensor) -> Optional[Tensor]:
    """The indices of the rows that did not diverge, or None when every row is live.

    A DIVERGED row must contribute exactly zero to every gradient: in a graph of f, even a zero
    upstream gradient meets its non-finite values as 0 * nan = nan in the parameters' sums.
    """
    dead = status == DIVERGED_CODE
    if not bool(dead.any()):
        return None
    return (~dead).nonzero().squeeze(1)


def finite_dead_rows(x: Any, status: Tensor) -> Any:
    """x with the non-finite entries of DIVERGED rows replaced by 0 (for a graph of f over the
    whole batch, under halting="batch": those rows' outputs are masked out, and must then
    meet only finite numbers in backward)."""
    dead = status == DIVERGED_CODE

    def clean(t: Tensor) -> Tensor:
        if not t.is_floating_point() or t.ndim == 0 or t.shape[0] != dead.shape[0]:
            return t
        bad = dead.view((-1,) + (1,) * (t.ndim - 1)) & ~torch.isfinite(t)
        return torch.where(bad, torch.zeros((), dtype=t.dtype, device=t.device), t)

    return map_tensors(clean, x)


# --- finished rows and the Solution ---------------------------------------------------------

class Finished:
    """Rows that stopped together: their states (loop layout), and on the host their original
    indices (None: all rows, in order), residuals, iteration counts and status codes."""

    __slots__ = ("rows", "z", "residual", "iterations", "status")

    def __init__(self, rows: Optional[np.ndarray], z: Tensor, residual: np.ndarray, iterations: np.ndarray,
                 status: np.ndarray) -> None:
        self.rows, self.z, self.residual, self.iterations, self.status = rows, z, residual, iterations, status


def done_code(criterion: Any) -> int:
    """The status of a sample whose criterion held: CONVERGED for the residual rule (no other
    criterion), HALTED for any other criterion."""
    return int(Status.CONVERGED) if criterion is None else int(Status.HALTED)


def converged(status: Tensor) -> Tensor:
    """Where a sample's criterion held: CONVERGED or HALTED."""
    return (status == int(Status.CONVERGED)) | (status == int(Status.HALTED))


def assemble(finished: Sequence[Finished], dev: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The finished chunks back in the original row order: (z, residual, iterations, status)."""
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    if len(finished) == 1 and finished[0].rows is None:   # everyone stopped together, in order
        c = finished[0]
        return c.z, tensor(c.residual), tensor(c.iterations), tensor(c.status)
    # Every chunk has its original rows once one was dropped; they form a permutation.
    inverse = np.argsort(np.concatenate([c.rows for c in finished]), kind="stable")
    pick = lambda name: tensor(np.concatenate([getattr(c, name) for c in finished])[inverse])  # noqa: E731
    z = torch.cat([c.z for c in finished]).index_select(0, index_tensor(inverse, dev))
    return z, pick("residual"), pick("iterations"), pick("status")


def solution(z: Tensor, r: Tensor, it: Tensor, status: Tensor, evaluations: int,
             trace: Optional[Tensor] = None) -> Solution:
    """A Solution from per-sample tensors (`converged` derived from the status)."""
    return Solution(z=z, iterations=it, residual=r, converged=converged(status), status=status,
                    evaluations=evaluations, trace=trace)


# --- the host side of a look ----------------------------------------------------------------

NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_}


def host_arrays(*ts: Tensor) -> List[np.ndarray]:
    """Small tensors as numpy arrays: views on a CPU, else one transfer (the look's one sync)."""
    if ts[0].device.type == "cpu":
        try:
            return [t.numpy() for t in ts]
        except RuntimeError:   # (tensors without storage, under torch.func transforms)
            return [np.array(t.tolist(), dtype=NUMPY[t.dtype]) for t in ts]
    return joined_to_host(*ts)


def joined_to_host(*ts: Tensor) -> List[np.ndarray]:
    """Tensors (floats of one dtype, or bool) brought to the host in one copy: concatenated
    on their device, then split (an accelerator's look pays one transfer, not one each)."""
    flat = torch.cat([t.reshape(-1).to(ts[0].dtype) for t in ts]).cpu().numpy()
    out, at = [], 0
    for t in ts:
        part = flat[at:at + t.numel()].reshape(tuple(t.shape))
        out.append(part.astype(NUMPY[t.dtype]) if t.dtype == torch.bool else part)
        at += t.numel()
    return out


def index_tensor(a: np.ndarray, dev: torch.device) -> Tensor:
    """An index array as an int64 tensor on the device."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)


__all__ = ["DIVERGENCE_FACTOR", "constant", "sample_norm", "floor", "limit", "limit_np", "first_stops",
           "window_answers", "check_step", "rounding", "Finished", "done_code", "converged", "assemble", "solution",
           "NUMPY", "host_arrays", "joined_to_host", "index_tensor"]
