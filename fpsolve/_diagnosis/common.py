"""What the steps of a diagnosis share: the problem in flat rows, the returned point, and the
account of rows spent and notes (a step that fails is reported, never raised)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch
from torch import Tensor

from .._options import Options
from .._tree import StateLayout


@dataclass
class Problem:
    """The map and its data as the analysis sees them: `flat_fn` maps [R, n] rows."""

    f: Callable[..., Any]                     # the user's f (for the restarts' solves)
    flat_fn: Callable[[Tensor, Any], Tensor]  # f on [R, n] rows of the loop's layout
    x: Any
    layout: StateLayout
    shape: torch.Size                         # the loop's state shape [B, ...]
    z0: Tensor                                # [B, n] the start, packed
    opts: Options

    @property
    def batch(self) -> int:
        return self.z0.shape[0]

    @property
    def width(self) -> int:
        return self.z0.shape[1]


@dataclass
class Point:
    """f at the returned point, per sample: the state and f(state) as [B, n] rows, the
    residual ||f(z) - z||, the tolerance atol + rtol ||f(z)|| (the rule in force), whether
    f(z) - z is finite, and whether the residual rule holds (`Residual.excess` <= 0)."""

    z: Tensor
    fz: Tensor
    residual: Tensor
    tolerance: Tensor
    finite: Tensor
    holds: Tensor

    @property
    def g(self) -> Tensor:
        """f(z) - z, [B, n]."""
        return self.fz - self.z


@dataclass
class Account:
    """Rows passed through f by each part of the diagnosis, and the notes on what failed."""

    evaluations: Dict[str, int]
    notes: List[str] = field(default_factory=list)

    @classmethod
    def start(cls, solve_rows: int) -> "Account":
        return cls({"solve": solve_rows, "plain": 0, "jvp": 0, "differences": 0, "restarts": 0, "other": 0})

    def failed(self, what: str, err: BaseException, consequence: str = "") -> None:
        """Note that a step failed: '<what> failed (<error>)[; <consequence>]'."""
        self.notes.append(f"{what} failed ({short(err)})" + (f"; {consequence}" if consequence else ""))


def short(err: BaseException) -> str:
    """An exception in one line: its type and the first 200 characters of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def random_like(t: Tensor, gen: torch.Generator) -> Tensor:
    """Standard normal noise shaped like t (drawn on the CPU generator, so seeds are portable)."""
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


def flat_fn(fn: Callable[[Tensor, Any], Tensor], shape: torch.Size) -> Callable[[Tensor, Any], Tensor]:
    """fn on [R, n] rows for a loop state of `shape` [B, ...] (identity when already flat)."""
    if len(shape) == 2:
        return fn
    inner = tuple(shape[1:])
    return lambda z, xa: fn(z.reshape((z.shape[0],) + inner), xa).reshape(z.shape[0], -1)


__all__ = ["Problem", "Point", "Account", "short", "random_like", "flat_fn"]
