"""Fixed-point correction: a few chosen iterates of the forward solve, each with a phantom
gradient, so that a loss can be applied along the path to the fixed point.

This is the training aid of DEQ-Flow (Bai et al., "Deep Equilibrium Optical Flow
Estimation", CVPR 2022) and of torchdeq's `indexing`/`n_states` with `fp_correction`: the
loss on early iterates pushes the block to reach a good answer in fewer passes, which
stabilises training. The loop keeps the chosen iterates by reference (`keep` in `_loop.py`);
this module only validates the option and attaches the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

from torch import Tensor

from ._backward import phantom_gradient
from ._checks import as_float, as_int


@dataclass(frozen=True)
class Correction:
    """Fixed-point correction: hand back the iterates at chosen passes, each with a phantom gradient.

    `sol.path` holds, per chosen pass, the solve's own iterate there with the gradient of
    `steps` damped passes z <- (1-λ) z + λ f(z, x) from it (as `Phantom` does for the
    solution), so a loss can be applied along the path (DEQ-Flow; torchdeq's fp_correction).
    A sample that stopped before a chosen pass contributes its returned iterate (`sol.z`'s
    value) there. Pass p is the iterate that f's p-th evaluation was applied to: for plain
    iteration from z0, f^(p-1)(z0), which torchdeq's `indexing=[p - 1]` stores.

    Args:
        passes: Increasing 1-based evaluation counts, each within the solve's `max_iter`.
        steps: Damped passes of f recorded from each kept iterate (>= 1).
        damping: λ in (0, 1].

    Raises:
        ValueError: passes empty, not increasing or < 1; steps < 1; damping outside (0, 1].

    Example:
        ```python
        W = (0.5 * torch.eye(3)).requires_grad_()
        x = torch.ones(2, 3)
        sol = fpsolve.solve(lambda z, x: z @ W + x, torch.zeros(2, 3), x, solver="fixed_point",
                            correction=fpsolve.Correction(passes=(2, 4)))
        loss = sum(0.8 ** i * p.pow(2).mean() for i, p in enumerate(reversed(sol.path)))
        loss.backward()                       # gradients along the path reach W
        assert W.grad is not None and len(sol.path) == 2
        ```
    """

    passes: Tuple[int, ...]
    steps: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        passes = self.passes
        if isinstance(passes, int) or not hasattr(passes, "__iter__"):
            raise TypeError(f"Correction(passes=...) must be a sequence of pass numbers, e.g. (5, 10); got {passes!r}.")
        passes = tuple(as_int("Correction(passes=...) entries", p) for p in passes)
        if not passes or any(b <= a for a, b in zip(passes, passes[1:])):
            raise ValueError(f"Correction(passes=...) must be non-empty and strictly increasing; got {passes!r}.")
        object.__setattr__(self, "passes", passes)
        object.__setattr__(self, "steps", as_int("Correction(steps=...)", self.steps))
        object.__setattr__(self, "damping", as_float("Correction(damping=...)", self.damping, strict=True, at_most=1.0))


def check_correction(correction: Any, max_iter: int) -> Tuple[int, ...]:
    """The passes to keep (empty for None); a clear error for anything else or a pass past the budget."""
    if correction is None:
        return ()
    if not isinstance(correction, Correction):
        raise TypeError(f"correction must be None or fpsolve.Correction(passes=...); got {correction!r}.")
    if correction.passes[-1] > max_iter:
        raise ValueError(
            f"Correction(passes={correction.passes}) asks for pass {correction.passes[-1]} but "
            f"max_iter={max_iter}: choose passes within the budget."
        )
    return correction.passes


def attach(fn: Callable[[Tensor, Any], Tensor], path: List[Tensor], status: Tensor, x: Any,
           correction: Correction, per_sample: bool) -> List[Tensor]:
    """Each kept iterate (loop layout) with the value it has and the phantom gradient of
    `correction.steps` passes from it; DIVERGED samples get none (as for `Phantom`)."""
    return [phantom_gradient(fn, z.detach(), status, x, correction.steps, correction.damping, per_sample)
            for z in path]


__all__ = ["Correction", "check_correction", "attach"]
