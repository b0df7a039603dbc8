"""Plain (optionally damped) fixed-point iteration: z <- z + damping * (f(z) - z)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import Tensor

from ._base import State, check_positive


@dataclass(frozen=True)
class FixedPointIteration:
    """Picard iteration, the way a looped network runs; `damping < 1` averages with the old z.

    The step is z <- z + damping (f(z) - z). It converges linearly at the contraction factor
    of f (of the damped map when damping < 1) and keeps no history. `solver="fixed_point"`
    builds `FixedPointIteration()`.

    Args:
        damping: The step's weight on f(z), in (0, 2]; 1 is plain iteration z <- f(z).

    Raises:
        ValueError: `damping` is not a number in (0, 2].

    Example:
        ```python
        f = lambda z: -0.9 * z + 1.0   # oscillates slowly; z* = 1/1.9
        plain = fpsolve.solve(f, torch.zeros(1, 1), solver=fpsolve.FixedPointIteration(), max_iter=200)
        damped = fpsolve.solve(f, torch.zeros(1, 1), solver=fpsolve.FixedPointIteration(damping=0.5))
        assert damped.iterations < plain.iterations and abs(float(damped.z) - 1 / 1.9) < 1e-3
        ```
    """

    damping: float = 1.0

    per_row = True   # (a class attribute, not a field) step() accepts a per-row k tensor

    def __post_init__(self) -> None:
        check_positive("FixedPointIteration(damping=...)", self.damping, at_most=2.0)

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        """The empty state: plain iteration keeps no history.

        Args:
            z: The first iterate of the active rows, `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.

        Returns:
            `()`.
        """
        return ()

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int | Tensor) -> Tuple[Tensor, State]:
        """The damped step z + damping · g (f(z) itself when damping is 1).

        Args:
            state: The state from `init` or the previous `step`, rows matching z.
            z: The current iterate `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.
            k: Evaluations already made for these rows, minus one (0 at the first step); or
                an int64 tensor `[b]` of per-row counts (`fpsolve.stream`), 0 marking a row
                that holds a new sample.

        Returns:
            The next iterate and the (empty) state.
        """
        if self.damping == 1.0:
            return fz, state
        return z.add(g, alpha=self.damping), state

    def reset(self, state: State, fresh: Tensor) -> State:
        """Nothing to restart: plain iteration keeps no history.

        Args:
            state: The (empty) state.
            fresh: bool `[b]`: the rows that now hold a new sample.

        Returns:
            The state, unchanged.
        """
        return state
