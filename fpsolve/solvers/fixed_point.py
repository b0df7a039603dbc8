"""Plain (optionally damped) fixed-point iteration: z <- z + damping * (f(z) - z)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import Tensor

from ._base import State, check_positive


@dataclass(frozen=True)
class FixedPointIteration:
    """Picard iteration, the way a looped network runs; `damping < 1` averages with the old z.

    Converges linearly at the contraction factor of f (of the damped map when damping < 1).
    """

    damping: float = 1.0

    per_row = True   # (a class attribute, not a field) step() accepts a per-row k tensor

    def __post_init__(self) -> None:
        check_positive("FixedPointIteration(damping=...)", self.damping, at_most=2.0)

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        return ()

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int | Tensor) -> Tuple[Tensor, State]:
        if self.damping == 1.0:
            return fz, state
        return z.add(g, alpha=self.damping), state
