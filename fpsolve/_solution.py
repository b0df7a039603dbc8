"""The result of a solve: `Solution` and the per-sample `Status` codes."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

import torch


class Status(enum.IntEnum):
    """Why a sample stopped. Stored per sample as int64 in `Solution.status`."""

    CONVERGED = 0
    MAX_ITER = 1
    DIVERGED = 2
    HALTED = 3

    @property
    def message(self) -> str:
        """What the status means and what a user can try."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "the halting criterion ||f(z) - z|| <= atol + rtol * ||f(z)|| held.",
    Status.MAX_ITER: (
        "the budget of max_iter evaluations was spent before the criterion held; raise "
        "max_iter, loosen rtol/atol, use an accelerated solver ('anderson', 'broyden'), or "
        "run fpsolve.diagnose to see whether the map contracts at all."
    ),
    Status.DIVERGED: (
        "f produced non-finite values or the residual blew up; z is the best finite iterate "
        "seen. Try damping (FixedPointIteration(damping=0.5)), a smaller Anderson mixing "
        "factor, spectral normalisation of the block, or fpsolve.diagnose."
    ),
    Status.HALTED: (
        "a criterion other than the residual rule (Stable, OutputKL, HaltHead) stopped the "
        "sample; sol.residual tells how far from a fixed point it is. Gradients through "
        "backward='implicit' assume a fixed point: a large residual makes them approximate."
    ),
}


@dataclass
class Solution:
    """Per-sample outcome of `fpsolve.solve` (all tensors batch-first, `[B]` unless noted).

    `z` has the structure of `z0`; it is, per sample, the iterate with the smallest residual
    seen (never a non-finite one). `evaluations` is the total number of rows passed through f.
    """

    z: Any
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    evaluations: int
    trace: Optional[torch.Tensor] = None
    #: with backward="implicit": the adjoint solve's own Solution, set when backward runs
    adjoint: Optional["Solution"] = None
    #: with DEQ(jacobian_penalty=k): per-sample estimate of ||∂f/∂z||_F² at z (differentiable)
    jacobian_penalty: Optional[torch.Tensor] = None

    def summary(self) -> str:
        """A short human-readable account of the batch."""
        if self.status.numel() == 0:
            return f"Solution(B=0: no samples; evaluations {self.evaluations})"
        counts = {s.name: int((self.status == s).sum()) for s in Status}
        it = self.iterations.double()
        parts = ", ".join(f"{k}: {v}" for k, v in counts.items() if v)
        finite = self.residual[torch.isfinite(self.residual)]
        worst = f"{float(finite.max()):.3g}" if finite.numel() else "n/a"
        return (
            f"Solution(B={self.status.numel()}; {parts}; iterations mean {it.mean():.1f} "
            f"max {int(it.max())}; evaluations {self.evaluations}; "
            f"max finite residual {worst})"
        )

    def __repr__(self) -> str:
        return self.summary()
