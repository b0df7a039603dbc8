"""Halting criteria as objects: when a sample stops (`Residual`, `Stable`, `OutputKL`, `HaltHead`).

A criterion sees, once per pass, the iterate `z` (in the user's structure), `f(z)`, and the
residual norms the loop computed; it answers a bool per sample ("halt here") and may keep a
small batch-first state (the previous readout, a patience counter). `Residual` is the default
rule and is handled by the loop's own arithmetic (no call per pass); any other criterion's
halts are reported as `Status.HALTED`. States are tuples of batch-first tensors, so the loop
can drop halted rows (`index_select`) and the stream can restart a refilled row (`reset`).

A criterion other than `Residual` judges the newest state, f's latest output f(z), and a
sample it halts returns that state: the halt costs no pass beyond the one that produced it.
`sol.residual` of such a sample is the size of that last step, ||f(z) - z||.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ._checks import as_float, as_int, as_tolerances
from ._rules import constant, sample_norm
from ._tree import select_rows, tensors_in

CriterionState = Tuple[Tensor, ...]


@dataclass(frozen=True)
class Residual:
    """Stop when ||f(z) - z|| <= atol + rtol * ||f(z)|| (per-sample norm "l2" or "inf").

    The default rule: `criterion=None` builds it from `atol`, `rtol` and `norm`. Passing it
    explicitly sets the tolerances in one place (then atol/rtol/norm given with other values
    are an error). Samples it stops are `CONVERGED`.

    Args:
        atol: Absolute tolerance (>= 0).
        rtol: Relative tolerance (>= 0; not both zero).
        norm: The per-sample norm: "l2" or "inf" (largest entry).

    Raises:
        TypeError: a tolerance that is not a number.
        ValueError: a negative tolerance, both tolerances zero, or an unknown `norm`.

    Example:
        ```python
        rule = fpsolve.Residual(rtol=1e-10, norm="inf")
        x = torch.rand(2, 3, dtype=torch.float64)
        sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, criterion=rule)
        assert bool((sol.status == fpsolve.Status.CONVERGED).all())
        assert bool((sol.residual <= 1e-10 * (0.5 * sol.z + x).abs().amax(dim=1)).all())
        ```
    """

    atol: float = 0.0
    rtol: float = 1e-4
    norm: str = "l2"

    def __post_init__(self) -> None:
        a, r = as_tolerances(self.atol, self.rtol, ("Residual(atol=...)", "Residual(rtol=...)"))
        object.__setattr__(self, "atol", a)
        object.__setattr__(self, "rtol", r)
        if self.norm not in ("l2", "inf"):
            raise ValueError(f"Residual(norm={self.norm!r}) is not known; use 'l2' or 'inf'.")

    # The rule's arithmetic, the one copy every part of fpsolve uses (as scipy's
    # TerminationCondition owns its test).
    def norms(self, g: Tensor, fz: Tensor) -> Tuple[Tensor, Tensor]:
        """Per sample (||f(z) - z||, ||f(z)||) in this rule's norm, given g = f(z) - z.

        Args:
            g: The residual f(z) - z, `[B, ...]`.
            fz: f(z), shaped like g.

        Returns:
            Two `[B]` tensors: the residual norms and the norms of f(z).
        """
        return sample_norm(g, self.norm), sample_norm(fz, self.norm)

    def excess(self, rn: Tensor, fnorm: Tensor) -> Tensor:
        """rn - (atol + rtol * fnorm): <= 0 exactly where the rule holds (nan never holds).

        Args:
            rn: `[B]` residual norms ||f(z) - z||.
            fnorm: `[B]` norms ||f(z)||.

        Returns:
            `[B]`: the margin by which each sample misses the rule (<= 0: it holds).
        """
        e = torch.addcmul(rn, fnorm, constant(-self.rtol, rn.dtype, rn.device))
        return e if self.atol == 0.0 else e - constant(self.atol, rn.dtype, rn.device)

    def holds(self, z: Tensor, fz: Tensor) -> Tensor:
        """Whether the rule holds at z, per sample (given f(z)).

        Args:
            z: The iterate `[B, ...]`.
            fz: f(z), shaped like z.

        Returns:
            bool `[B]`.

        Example:
            ```python
            z = torch.tensor([[1.0], [2.0]])
            print(fpsolve.Residual(rtol=1e-3).holds(z, 0.5 * z + 1))   # z* = 2: tensor([False,  True])
            ```
        """
        rn, fnorm = self.norms(fz - z, fz)
        return self.excess(rn, fnorm) <= 0


def _check_readout(owner: str, readout: Any) -> None:
    if not callable(readout):
        raise TypeError(f"{owner}(readout=...) must be callable as readout(z) -> logits [B, ..., C]; got {readout!r}.")


def _logits(owner: str, readout: Callable[[Any], Tensor], z: Any, batch: int) -> Tensor:
    out = readout(z)
    if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != batch or out.shape[-1] < 2:
        got = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
        raise ValueError(f"{owner}: readout(z) must return logits [B, ..., C] with B = {batch} and C >= 2 "
                         f"classes; got {got}. (With one class the answer never changes; a scalar halting "
                         f"score per sample belongs to fpsolve.HaltHead.)")
    if not out.is_floating_point():
        raise TypeError(f"{owner}: readout(z) must return floating logits; got {out.dtype}.")
    return out


@dataclass(frozen=True)
class Stable:
    """Stop when the read-out answer argmax(readout(z)) has not changed for `patience` passes.

    The argmax is over the last dimension of readout(z) (`[B, C]` or `[B, ..., C]`) and must
    hold at every position: the answer a looped model would read out has settled (the halting
    study's K_sat). Samples it stops are `HALTED`; `sol.residual` still says how far from a
    fixed point they are.

    Args:
        readout: `readout(z) -> ` logits `[B, ..., C]`.
        patience: Passes the argmax must stay unchanged (an integer >= 1).

    Raises:
        TypeError: `readout` not callable, or `patience` not an integer.
        ValueError: `patience` < 1; during a solve, readout(z) not a tensor with B rows.

    Example:
        ```python
        readout = lambda z: torch.stack((z[:, 0], 1 - z[:, 0]), dim=1)   # 2 classes
        f = lambda z, x: 0.9 * z + x   # z* = 10 x, reached slowly
        sol = fpsolve.solve(f, torch.zeros(2, 1), torch.tensor([[0.2], [-0.2]]),
                            solver="fixed_point", criterion=fpsolve.Stable(readout, patience=2))
        assert bool((sol.status == fpsolve.Status.HALTED).all()) and int(sol.iterations.max()) < 50
        ```
    """

    readout: Callable[[Any], Tensor]
    patience: int = 1

    def __post_init__(self) -> None:
        _check_readout("Stable", self.readout)
        object.__setattr__(self, "patience", as_int("Stable(patience=...)", self.patience))

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        """A fresh state: no answer seen yet, patience count 0.

        Args:
            z: The first iterate, in the user's structure.
            batch: The number of rows.
            device: The state's device.

        Returns:
            A tuple of batch-first tensors (None entries pass through).
        """
        seen = torch.zeros(batch, dtype=torch.bool, device=device)
        return (seen, torch.zeros(batch, dtype=torch.int64, device=device), None)  # type: ignore[return-value]

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        """Whether each row's answer has stayed the same for `patience` passes.

        Args:
            z: The current iterate, in the user's structure.
            fz: f(z), in the same structure.
            state: The state from `init` or the previous `check`.

        Returns:
            bool `[b]` ("halt here") and the new state.
        """
        seen, count, prev = state
        cls = _logits("Stable", self.readout, fz, seen.shape[0]).argmax(dim=-1).reshape(seen.shape[0], -1)
        if prev is None:
            prev = cls
        same = seen & (cls == prev).all(dim=1)
        count = torch.where(same, count + 1, torch.zeros_like(count))
        return count >= self.patience, (torch.ones_like(seen), count, cls)

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        """Forget the `fresh` rows' previous answer and count (a refilled `stream` slot).

        Args:
            state: The criterion state of the rows in flight.
            fresh: bool `[b]`: the rows that now hold a new sample.

        Returns:
            The state, with the `fresh` rows starting afresh.
        """
        seen, count, prev = state
        return (seen & ~fresh, torch.where(fresh, torch.zeros_like(count), count), prev)


@dataclass(frozen=True)
class OutputKL:
    """Stop when the read-out distribution has stopped moving: KL(p_k || p_{k-1}) <= tol.

    p_k = softmax(readout(z_k)) over the last dimension; the KL is the largest over
    positions (the rule of recurrent-depth LMs). Samples it stops are `HALTED`.

    Args:
        readout: `readout(z) -> ` logits `[B, ..., C]`.
        tol: The KL threshold (>= 0).

    Raises:
        TypeError: `readout` not callable, or `tol` not a number.
        ValueError: a negative `tol`; during a solve, readout(z) not a tensor with B rows.

    Example:
        ```python
        readout = lambda z: 5 * z   # logits over the last dimension
        f = lambda z, x: 0.8 * z + x
        x = torch.tensor([[0.1, -0.1, 0.0]])
        sol = fpsolve.solve(f, torch.zeros(1, 3), x, criterion=fpsolve.OutputKL(readout, tol=1e-4))
        assert sol.status.tolist() == [int(fpsolve.Status.HALTED)]
        ```
    """

    readout: Callable[[Any], Tensor]
    tol: float = 1e-3

    def __post_init__(self) -> None:
        _check_readout("OutputKL", self.readout)
        object.__setattr__(self, "tol", as_float("OutputKL(tol=...)", self.tol))

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        """A fresh state: no previous distribution yet.

        Args:
            z: The first iterate, in the user's structure.
            batch: The number of rows.
            device: The state's device.

        Returns:
            A tuple of batch-first tensors (None entries pass through).
        """
        return (torch.zeros(batch, dtype=torch.bool, device=device), None)  # type: ignore[return-value]

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        """Whether each row's read-out distribution moved by at most `tol` (KL) since the last pass.

        Args:
            z: The current iterate, in the user's structure.
            fz: f(z), in the same structure.
            state: The state from `init` or the previous `check`.

        Returns:
            bool `[b]` ("halt here") and the new state.
        """
        seen, prev = state
        logits = _logits("OutputKL", self.readout, fz, seen.shape[0])
        logp = torch.log_softmax(logits.float(), dim=-1).reshape(seen.shape[0], -1, logits.shape[-1])
        if prev is None:
            prev = logp
        p = logp.exp()
        # (a class masked to -inf in both passes has p = 0 and contributes 0, not 0 * nan)
        kl = torch.where(p > 0, p * (logp - prev), torch.zeros((), dtype=p.dtype, device=p.device))
        kl = kl.sum(dim=-1).amax(dim=1)
        return seen & (kl <= self.tol), (torch.ones_like(seen), logp)

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        """Forget the `fresh` rows' previous distribution (a refilled `stream` slot).

        Args:
            state: The criterion state of the rows in flight.
            fresh: bool `[b]`: the rows that now hold a new sample.

        Returns:
            The state, with the `fresh` rows starting afresh.
        """
        seen, prev = state
        return (seen & ~fresh, prev)


@dataclass(frozen=True)
class HaltHead:
    """Stop when sigmoid(head(z)) >= threshold: a learned ACT-style halt.

    Samples it stops are `HALTED`. The head is only read to decide halting: training it is
    the user's (e.g. a loss on `sigmoid(head(z))`).

    Args:
        head: `head(z) -> ` one logit per sample, `[B]` or `[B, 1]` (e.g. an `nn.Linear(d, 1)`).
        threshold: The halting probability, in (0, 1].

    Raises:
        TypeError: `head` not callable, or `threshold` not a number.
        ValueError: `threshold` outside (0, 1]; during a solve, head(z) not one logit per sample.

    Example:
        ```python
        head = lambda z: 10 * (z[:, 0] - 1.0)   # halts once the first entry passes about 1
        f = lambda z, x: 0.5 * z + x            # z* = 2x = 2
        sol = fpsolve.solve(f, torch.zeros(3, 2), torch.ones(3, 2), criterion=fpsolve.HaltHead(head))
        assert bool((sol.status == fpsolve.Status.HALTED).all()) and float(sol.z[0, 0]) >= 1.0
        ```
    """

    head: Callable[[Any], Tensor]
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not callable(self.head):
            raise TypeError(f"HaltHead(head=...) must be callable as head(z) -> logits [B]; got {self.head!r}.")
        t = as_float("HaltHead(threshold=...)", self.threshold, strict=True, at_most=1.0)
        object.__setattr__(self, "threshold", t)

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        """The empty state: the head decides from the current z alone.

        Args:
            z: The first iterate, in the user's structure.
            batch: The number of rows.
            device: The state's device.

        Returns:
            A tuple of batch-first tensors (None entries pass through).
        """
        return ()

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        """Whether sigmoid(head(z)) >= threshold, per row.

        Args:
            z: The current iterate, in the user's structure.
            fz: f(z), in the same structure.
            state: The state from `init` or the previous `check`.

        Returns:
            bool `[b]` ("halt here") and the new state.
        """
        logit = self.head(fz)
        b = tensors_in(fz)[0].shape[0]
        if not isinstance(logit, Tensor) or logit.ndim == 0 or logit.shape[0] != b or logit[0].numel() != 1:
            got = type(logit).__name__ if not isinstance(logit, Tensor) else f"shape {tuple(logit.shape)}"
            raise ValueError(f"HaltHead: head(z) must return one logit per sample ([B] or [B, 1]); got {got}.")
        if not logit.is_floating_point():
            raise TypeError(f"HaltHead: head(z) must return a floating logit per sample (sigmoid(logit) >= "
                            f"threshold halts); got {logit.dtype}, which would halt every sample at once.")
        return torch.sigmoid(logit.reshape(b).float()) >= self.threshold, ()

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        """Nothing to forget: the state is empty.

        Args:
            state: The criterion state of the rows in flight.
            fresh: bool `[b]`: the rows that now hold a new sample.

        Returns:
            The state, with the `fresh` rows starting afresh.
        """
        return state


@dataclass(frozen=True)
class Depth:
    """Fixed depth: every sample halts after exactly `passes` evaluations of f, as a looped model runs.

    The sample's answer is f's last output z_K; with plain iteration (the solver `Depth`
    runs with unless a solver object is passed) that is f^K(z0), what a looped network with K
    passes returns. Samples are `HALTED` (never `CONVERGED`); a non-finite or blown-up sample is
    still `DIVERGED`. `sol.residual` is the size of the last step, ||z_K - z_(K-1)||. Under
    `Unroll(steps=k)` or `Phantom(steps=k)` the last k of the K passes are recorded (the first
    K - k run without autograd) and the value stays z_K.

    Args:
        passes: K, the evaluations of f every sample receives (an integer >= 1, at most max_iter).

    Raises:
        TypeError: `passes` not an integer.
        ValueError: `passes` < 1 (and, in a solve, `passes` > max_iter).

    Example:
        ```python
        sol = fpsolve.solve(lambda z: z + 1, torch.zeros(3, 1), criterion=fpsolve.Depth(5))
        assert sol.z.flatten().tolist() == [5.0, 5.0, 5.0] and sol.iterations.tolist() == [5, 5, 5]
        ```
    """

    passes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", as_int("Depth(passes=...)", self.passes))

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        """A fresh count of evaluations: 0 per row.

        Args:
            z: The first iterate, in the user's structure.
            batch: The number of rows.
            device: The state's device.

        Returns:
            A tuple holding the per-row count.
        """
        return (torch.zeros(batch, dtype=torch.int64, device=device),)

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        """Whether each row has now had `passes` evaluations of f.

        Args:
            z: The current iterate, in the user's structure.
            fz: f(z), in the same structure (the newest state).
            state: The state from `init` or the previous `check`.

        Returns:
            bool `[b]` ("halt here") and the new state.
        """
        (count,) = state
        count = count + 1
        return count >= self.passes, (count,)

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        """Start the `fresh` rows' counts again (a refilled `stream` slot).

        Args:
            state: The criterion state of the rows in flight.
            fresh: bool `[b]`: the rows that now hold a new sample.

        Returns:
            The state, with the `fresh` rows' counts at 0.
        """
        (count,) = state
        return (torch.where(fresh, torch.zeros_like(count), count),)


Criterion = Any   # Residual | Stable | OutputKL | HaltHead (or an object with init/check/reset)


def make_criterion(criterion: Any, atol: float, rtol: float, norm: str,
                   defaults: Tuple[float, float, str] = (0.0, 1e-4, "l2")) -> Tuple[Residual, Optional[Any]]:
    """(the residual rule, the other criterion or None) from solve's arguments.

    With `criterion=Residual(...)` its tolerances replace atol/rtol/norm (giving both, different,
    is an error). With another criterion, atol/rtol/norm still set the reported residual's norm
    and the implicit backward's tolerance.
    """
    if criterion is None:
        return Residual(atol, rtol, norm), None
    if isinstance(criterion, Residual):
        if (atol, rtol, norm) != defaults and (atol, rtol, norm) != (criterion.atol, criterion.rtol, criterion.norm):
            raise ValueError(
                "criterion=Residual(...) and atol/rtol/norm were both given with different values; "
                "set the tolerances in one place."
            )
        return criterion, None
    if isinstance(criterion, type):
        raise TypeError(f"criterion={criterion.__name__} is a class; pass an instance, e.g. {criterion.__name__}(readout).")
    if not all(callable(getattr(criterion, a, None)) for a in ("init", "check", "reset")):
        raise TypeError(
            f"criterion must be None, fpsolve.Residual/Stable/OutputKL/HaltHead, or an object with "
            f"init, check and reset; got {criterion!r}."
        )
    return Residual(atol, rtol, norm), criterion


class PackedCriterion:
    """A criterion other than the residual rule, seen by the loop on its packed tensors: the
    loop's `[b, D]` iterates are unpacked to the user's structure for the criterion."""

    def __init__(self, criterion: Any, unpack: Callable[[Tensor], Any]) -> None:
        self.criterion, self.unpack = criterion, unpack

    def init(self, z: Tensor) -> Any:
        return self.criterion.init(self.unpack(z), z.shape[0], z.device)

    def __call__(self, z: Tensor, fz: Tensor, state: Any) -> Tuple[Tensor, Any]:
        mask, state = self.criterion.check(self.unpack(z), self.unpack(fz), state)
        if not isinstance(mask, Tensor) or mask.shape != (z.shape[0],) or not (
                mask.dtype == torch.bool or not mask.is_floating_point()):
            got = f"shape {tuple(mask.shape)}, dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"criterion {self.criterion!r}: check() must return a bool tensor [B] with "
                             f"B = {z.shape[0]} (one verdict per sample); got {got}.")
        return mask.to(device=z.device, dtype=torch.bool), state

    def reset(self, state: Any, fresh: Tensor) -> Any:
        return self.criterion.reset(state, fresh)

    def depth(self) -> Optional[int]:
        """K when the criterion is `Depth(K)` (fixed depth), else None."""
        return self.criterion.passes if isinstance(self.criterion, Depth) else None

    def replaced(self, criterion: Any) -> "PackedCriterion":
        """The same adapter around another criterion."""
        return PackedCriterion(criterion, self.unpack)

    @staticmethod
    def select(state: Any, rows: Tensor) -> Any:
        """The state of the rows `rows` (the loop dropped the others)."""
        return select_rows(state, rows)


__all__ = ["Residual", "Stable", "OutputKL", "HaltHead", "Depth", "make_criterion", "PackedCriterion"]
