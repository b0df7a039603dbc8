"""Halting criteria as objects: when a sample stops (`Residual`, `Stable`, `OutputKL`, `HaltHead`).

A criterion sees, once per pass, the iterate `z` (in the user's structure), `f(z)`, and the
residual norms the loop computed; it answers a bool per sample ("halt here") and may keep a
small batch-first state (the previous readout, a patience counter). `Residual` is the default
rule and is handled by the loop's own arithmetic (no call per pass); any other criterion's
halts are reported as `Status.HALTED`. States are tuples of batch-first tensors, so the loop
can drop halted rows (`index_select`) and the stream can restart a refilled row (`reset`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ._checks import as_float, as_int, as_tolerances

CriterionState = Tuple[Tensor, ...]


@dataclass(frozen=True)
class Residual:
    """Stop when ||f(z) - z|| <= atol + rtol * ||f(z)|| (per-sample norm "l2" or "inf")."""

    atol: float = 0.0
    rtol: float = 1e-4
    norm: str = "l2"

    def __post_init__(self) -> None:
        a, r = as_tolerances(self.atol, self.rtol, ("Residual(atol=...)", "Residual(rtol=...)"))
        object.__setattr__(self, "atol", a)
        object.__setattr__(self, "rtol", r)
        if self.norm not in ("l2", "inf"):
            raise ValueError(f"Residual(norm={self.norm!r}) is not known; use 'l2' or 'inf'.")


def _check_readout(owner: str, readout: Any) -> None:
    if not callable(readout):
        raise TypeError(f"{owner}(readout=...) must be callable as readout(z) -> logits [B, ..., C]; got {readout!r}.")


def _logits(owner: str, readout: Callable[[Any], Tensor], z: Any, batch: int) -> Tensor:
    out = readout(z)
    if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != batch:
        got = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
        raise ValueError(f"{owner}: readout(z) must return a tensor [B, ..., C] with B = {batch}; got {got}.")
    return out if out.ndim > 1 else out.unsqueeze(1)


@dataclass(frozen=True)
class Stable:
    """Stop when argmax(readout(z)) (over the last dim; readout(z) is [B, C] or [B, ..., C]) has
    not changed at any position for `patience` passes: the answer a looped model would read out
    has settled (the halting study's K_sat)."""

    readout: Callable[[Any], Tensor]
    patience: int = 1

    def __post_init__(self) -> None:
        _check_readout("Stable", self.readout)
        object.__setattr__(self, "patience", as_int("Stable(patience=...)", self.patience))

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        seen = torch.zeros(batch, dtype=torch.bool, device=device)
        return (seen, torch.zeros(batch, dtype=torch.int64, device=device), None)  # type: ignore[return-value]

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        seen, count, prev = state
        cls = _logits("Stable", self.readout, z, seen.shape[0]).argmax(dim=-1).reshape(seen.shape[0], -1)
        if prev is None:
            prev = cls
        same = seen & (cls == prev).all(dim=1)
        count = torch.where(same, count + 1, torch.zeros_like(count))
        return count >= self.patience, (torch.ones_like(seen), count, cls)

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        seen, count, prev = state
        return (seen & ~fresh, torch.where(fresh, torch.zeros_like(count), count), prev)


@dataclass(frozen=True)
class OutputKL:
    """Stop when KL(softmax(readout(z_k)) || softmax(readout(z_{k-1}))) <= tol, the largest over
    positions: the read-out distribution has stopped moving (the rule of recurrent-depth LMs)."""

    readout: Callable[[Any], Tensor]
    tol: float = 1e-3

    def __post_init__(self) -> None:
        _check_readout("OutputKL", self.readout)
        object.__setattr__(self, "tol", as_float("OutputKL(tol=...)", self.tol))

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        return (torch.zeros(batch, dtype=torch.bool, device=device), None)  # type: ignore[return-value]

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        seen, prev = state
        logits = _logits("OutputKL", self.readout, z, seen.shape[0])
        logp = torch.log_softmax(logits.float(), dim=-1).reshape(seen.shape[0], -1, logits.shape[-1])
        if prev is None:
            prev = logp
        kl = (logp.exp() * (logp - prev)).sum(dim=-1).amax(dim=1)
        return seen & (kl <= self.tol), (torch.ones_like(seen), logp)

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        seen, prev = state
        return (seen & ~fresh, prev)


@dataclass(frozen=True)
class HaltHead:
    """Stop when sigmoid(head(z)) >= threshold: a learned ACT-style halt (head(z) -> [B] logits)."""

    head: Callable[[Any], Tensor]
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not callable(self.head):
            raise TypeError(f"HaltHead(head=...) must be callable as head(z) -> logits [B]; got {self.head!r}.")
        t = as_float("HaltHead(threshold=...)", self.threshold, strict=True, at_most=1.0)
        object.__setattr__(self, "threshold", t)

    def init(self, z: Any, batch: int, device: torch.device) -> CriterionState:
        return ()

    def check(self, z: Any, fz: Any, state: Any) -> Tuple[Tensor, CriterionState]:
        logit = self.head(z)
        b = next(iter(_leaves(z))).shape[0]
        if not isinstance(logit, Tensor) or logit.shape[0] != b or logit[0].numel() != 1:
            got = type(logit).__name__ if not isinstance(logit, Tensor) else f"shape {tuple(logit.shape)}"
            raise ValueError(f"HaltHead: head(z) must return one logit per sample ([B] or [B, 1]); got {got}.")
        return torch.sigmoid(logit.reshape(b).float()) >= self.threshold, ()

    @staticmethod
    def reset(state: Any, fresh: Tensor) -> CriterionState:
        return state


def _leaves(z: Any) -> Tuple[Tensor, ...]:
    return (z,) if isinstance(z, Tensor) else tuple(z)


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


def compact_state(state: Any, keep: Tensor) -> Any:
    """The rows `keep` of every tensor in a criterion state (None entries pass through)."""
    return tuple(s.index_select(0, keep) if isinstance(s, Tensor) else s for s in state)


__all__ = ["Residual", "Stable", "OutputKL", "HaltHead", "make_criterion", "compact_state"]
