"""The result of a solve: `Solution` and the per-sample `Status` codes."""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ._tree import map_tensors


class Status(enum.IntEnum):
    """Why a sample stopped: stored per sample as int64 in `Solution.status` (an `IntEnum`).

    Members: `CONVERGED` (the residual rule held at the returned `z`), `MAX_ITER` (the
    budget of `max_iter` evaluations was spent first), `DIVERGED` (f produced non-finite
    values or the residual blew up; `z` is the best finite iterate), `HALTED` (a criterion
    other than `Residual`, e.g. `Stable`, stopped the sample). Compare a status tensor with a
    member directly; `Status(code).message` says what a code means and what to try.

    Example:
        ```python
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(3, 2), torch.ones(3, 2))
        assert bool((sol.status == fpsolve.Status.CONVERGED).all())
        print(fpsolve.Status(int(sol.status[0])).name)   # CONVERGED
        print(fpsolve.Status.MAX_ITER.message)
        ```
    """

    CONVERGED = 0
    MAX_ITER = 1
    DIVERGED = 2
    HALTED = 3

    @property
    def message(self) -> str:
        """One sentence: what the status means and what a user can try.

        Returns:
            The message, e.g. for `MAX_ITER`: raise max_iter, loosen the tolerance, ...

        Example:
            ```python
            print(fpsolve.Status.DIVERGED.message)
            ```
        """
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

    Returned by `solve`, `solve_stream` and `DEQ` (as the second output); not made by users.
    `print(sol)` shows `sol.summary()`.

    Attributes:
        z: Per sample, the iterate with the smallest residual seen (never a non-finite one),
            in the structure of `z0` (a tensor, or a tuple/list of tensors). Differentiable
            as the `backward` option says. Under `halting="batch"`, one iterate of the
            whole batch.
        iterations: int64 `[B]`: evaluations of f that each sample received.
        residual: `[B]`: ||f(z) - z|| at the returned `z`, in the solve's `norm`.
        converged: bool `[B]`: the sample's halting criterion held (`CONVERGED` or `HALTED`).
        status: int64 `[B]` of `Status` codes.
        evaluations: The total number of rows passed through f (the compute spent).
        trace: `[T, B]` residual at each iteration (nan once a sample halted), with
            `record=True`; otherwise None.
        adjoint: With `backward="implicit"`: the adjoint solve's own `Solution`, set when
            backward runs; otherwise None.
        jacobian_penalty: With `DEQ(jacobian_penalty=k)`: `[B]` Hutchinson estimate of
            ||∂f/∂z||_F² at `z` (differentiable); otherwise None.
        path: With `correction=fpsolve.Correction(passes=...)`: one entry per chosen pass, the
            iterate there in the structure of `z0`, with a phantom gradient; otherwise None.

    Example:
        ```python
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(4, 3), torch.ones(4, 3))
        assert torch.allclose(sol.z, torch.full((4, 3), 2.0), atol=1e-3)   # z* = 2x
        print(sol.iterations, sol.status, sol.converged.all())
        print(sol)   # the summary line
        ```
    """

    z: Any
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    evaluations: int
    trace: Optional[torch.Tensor] = None
    #: with DEQ(jacobian_penalty=k): per-sample estimate of ||∂f/∂z||_F² at z (differentiable)
    jacobian_penalty: Optional[torch.Tensor] = None
    #: with correction=fpsolve.Correction(passes=...): per chosen pass, every sample's iterate
    #: there (like z0), carrying the correction's phantom gradient (fpsolve/_correction.py)
    path: Optional[List[Any]] = None
    #: one cell shared with every `detached()` copy: the implicit backward fills it once
    _adjoint_cell: List[Any] = field(default_factory=lambda: [None], init=False, repr=False, compare=False)

    @property
    def adjoint(self) -> Optional["Solution"]:
        """With backward="implicit": the adjoint solve's own Solution, set when backward runs.

        Every `detached()` copy sees it too (they share one cell).

        Returns:
            The adjoint's `Solution`, or None before backward (and for other backward modes).
        """
        return self._adjoint_cell[0]

    @adjoint.setter
    def adjoint(self, value: Optional["Solution"]) -> None:
        self._adjoint_cell[0] = value

    def summary(self) -> str:
        """A one-line human-readable account of the batch (what `print(sol)` shows).

        Returns:
            The batch size, the count of each status present, the mean and largest
            iterations, the evaluations and the largest finite residual.

        Example:
            ```python
            sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), torch.ones(2, 3))
            print(sol.summary())   # Solution(B=2; CONVERGED: 2; iterations mean ...)
            ```
        """
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
        """A flat dict of floats for loggers (TensorBoard, W&B, a CSV row).

        One host sync (two with the adjoint). Fractions are of the batch, per status (they sum to 1). Residual quantiles are over
        the finite residuals only; nan when there is none (an empty or wholly diverged batch).
        An empty batch gives 0 for counts, means and fractions. After an implicit backward
        (`adjoint` set) the adjoint solve's figures are added under `adjoint_...`.

        Returns:
            `batch_size`, `iterations_mean`/`_min`/`_max`, `converged_fraction`,
            `max_iter_fraction`, `diverged_fraction`, `halted_fraction`, `residual_median`,
            `residual_p90`, `residual_max`, `evaluations`; with `adjoint` set, also
            `adjoint_iterations_mean`, `adjoint_iterations_max`, `adjoint_converged_fraction`,
            `adjoint_residual_max` and `adjoint_evaluations`.

        Example:
            ```python
            sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(4, 3), torch.ones(4, 3))
            stats = sol.stats()
            assert stats["converged_fraction"] == 1.0
            print(stats["iterations_mean"], stats["residual_max"])
            ```
        """
        halted = int(Status.HALTED)
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
        """A copy without autograd history, safe to keep (e.g. `DEQ.last_solution`) and to deepcopy.

        The copy still receives `adjoint` when this solution's implicit backward runs.

        Returns:
            A shallow copy whose `z` (and `jacobian_penalty`) are detached; its `adjoint` is
            set when this solution's implicit backward runs.

        Example:
            ```python
            x = torch.ones(2, 3, requires_grad=True)
            sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), x)
            kept = sol.detached()
            sol.z.sum().backward()
            assert not kept.z.requires_grad and kept.adjoint is not None
            ```
        """
        twin = copy.copy(self)   # (shares the adjoint cell: a later backward fills both)
        twin.z = map_tensors(torch.Tensor.detach, self.z)
        if self.path is not None:
            twin.path = [map_tensors(torch.Tensor.detach, p) for p in self.path]
        if self.jacobian_penalty is not None:
            twin.jacobian_penalty = self.jacobian_penalty.detach()
        return twin
