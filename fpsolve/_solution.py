"""The result of a solve: `Solution` and the per-sample `Status` codes."""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

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
    #: with correction=fpsolve.Correction(passes=...): per chosen pass, every sample's iterate
    #: there (like z0), carrying the correction's phantom gradient (fpsolve/_correction.py)
    path: Optional[List[Any]] = None

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

    def stats(self) -> Dict[str, float]:
        """A flat dict of floats for loggers (TensorBoard, W&B, a CSV row), one host sync
        (two with the adjoint).

        Fractions are of the batch, per status (they sum to 1). Residual quantiles are over
        the finite residuals only; nan when there is none (an empty or wholly diverged batch).
        An empty batch gives 0 for counts, means and fractions. After an implicit backward
        (`adjoint` set) the adjoint solve's figures are added under `adjoint_...`.
        """
        # Status.HALTED (= 3) is being added in parallel; its integer code is used until then.
        halted = int(getattr(Status, "HALTED", 3))
        n = self.status.numel()
        out: Dict[str, float] = {"batch_size": float(n)}
        if n == 0:
            values: List[float] = [0.0] * 7 + [math.nan] * 3
        else:
            it = self.iterations.double()
            counts = torch.bincount(self.status.flatten(), minlength=halted + 1).double() / n
            r = self.residual.detach().double()
            r = r.masked_fill(~torch.isfinite(r), math.nan)
            q = torch.nanquantile(r, torch.tensor([0.5, 0.9, 1.0], dtype=r.dtype, device=r.device))
            values = torch.cat((torch.stack((it.mean(), it.min(), it.max())),
                                counts[[int(Status.CONVERGED), int(Status.MAX_ITER), int(Status.DIVERGED), halted]],
                                q)).tolist()
        names = ("iterations_mean", "iterations_min", "iterations_max", "converged_fraction",
                 "max_iter_fraction", "diverged_fraction", "halted_fraction", "residual_median",
                 "residual_p90", "residual_max")
        out.update(zip(names, values))
        out["evaluations"] = float(self.evaluations)
        if self.adjoint is not None:
            adj = self.adjoint.stats()
            for key in ("iterations_mean", "iterations_max", "converged_fraction", "residual_max",
                        "evaluations"):
                out["adjoint_" + key] = adj[key]
        return out

    def detached(self) -> "Solution":
        """A copy without autograd history that still receives `adjoint` when this solution's
        implicit backward runs: safe to keep (e.g. `DEQ.last_solution`) and to deepcopy."""
        twin = copy.copy(self)
        twin.__dict__.pop("_followers", None)
        twin.z = _detach(self.z)
        if self.path is not None:
            twin.path = [_detach(p) for p in self.path]
        if self.jacobian_penalty is not None:
            twin.jacobian_penalty = self.jacobian_penalty.detach()
        self.__dict__.setdefault("_followers", []).append(twin)
        return twin

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "adjoint":   # set by the implicit backward: tell the detached copies too
            for twin in self.__dict__.get("_followers", ()):
                twin.adjoint = value


def _detach(z: Any) -> Any:
    if isinstance(z, torch.Tensor):
        return z.detach()
    if isinstance(z, (tuple, list)):
        return type(z)(_detach(t) for t in z)
    return z
