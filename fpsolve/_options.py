"""One options object: `solve`, `DEQ`, `stream`, `solve_stream` and `diagnose` normalise their
keyword options here, once (defaults, validation, the criterion), and read them the same way.

The shape of torchdiffeq's `_check_inputs`: one normaliser for every entry point, so a
default, a check or a message lives in one place. Numbers come back as plain Python numbers
(numpy scalars and 0-dim tensors are accepted as the numbers they are).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from ._backward import Backward, make_backward
from ._checks import as_bool, as_int, as_tolerances
from ._correction import Correction, check_correction
from ._criteria import Depth, Residual, make_criterion
from ._rules import done_code
from .solvers import Solver, make_solver

HALTINGS = ("sample", "batch")
NORMS = ("l2", "inf")
#: passes between two host looks, in solve (halting="sample") and stream: measured, see
#: docs/streaming.md (the check_every sweep)
DEFAULT_CHECK_EVERY = 4

#: The options of `solve` and their defaults (`DEQ` differs in max_iter only).
SOLVE_DEFAULTS: Dict[str, Any] = dict(
    solver="anderson", atol=0.0, rtol=1e-4, max_iter=50, halting="sample", backward="implicit",
    norm="l2", record=False, criterion=None, check_every=None, min_iter=None, correction=None)
DEQ_DEFAULTS: Dict[str, Any] = dict(SOLVE_DEFAULTS, max_iter=30)
#: The solver options of `stream` and `solve_stream` (beside slots, z0 and compile).
STREAM_DEFAULTS: Dict[str, Any] = dict(
    solver="anderson", atol=0.0, rtol=1e-4, max_iter=50, norm="l2", criterion=None, check_every=None,
    min_iter=None)


def check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    """value, when it is one of the allowed names; a clear error otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of {list(choices)}.")
    return value


@dataclass(frozen=True)
class Options:
    """A solve's options, normalised: objects instead of names, plain numbers, one criterion.

    `rule` is the residual rule (it decides CONVERGED, the reported residual's norm and the
    implicit adjoint's tolerance); `criterion` is another criterion whose stops are HALTED,
    or None. `given` keeps the user's values (normalised) for `repr` and `DEQ.options`.
    """

    solver: Solver
    rule: Residual
    criterion: Optional[Any]
    max_iter: int
    halting: str = "sample"
    backward: Optional[Backward] = None
    record: bool = False
    check_every: Optional[int] = None   # None: solve predicts each look (see _sample_loop); stream: 4
    correction: Optional[Correction] = None
    min_iter: int = 1
    given: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def make(cls, where: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> "Options":
        """Options from `given` keyword values over `defaults`; unknown names are an error."""
        unknown = set(given) - set(defaults)
        if unknown:
            owner = "stream" if defaults is STREAM_DEFAULTS else "solve"
            raise TypeError(f"{where} got unknown options {sorted(unknown)}: {owner} does not take them; "
                            f"{owner} takes {sorted(defaults)}.")
        o = {**defaults, **given}
        atol, rtol = as_tolerances(o["atol"], o["rtol"])
        max_iter = as_int("max_iter", o["max_iter"])
        norm = check_choice("norm", o["norm"], NORMS)
        rule, other = make_criterion(o["criterion"], atol, rtol, norm,
                                     (defaults["atol"], defaults["rtol"], defaults["norm"]))
        halting = check_choice("halting", o.get("halting", "sample"), HALTINGS)
        backward = make_backward(o.get("backward", "none"))
        record = as_bool("record", o.get("record", False))
        every = o["check_every"]
        every = None if every is None else as_int("check_every", every)
        correction = o.get("correction")
        check_correction(correction, max_iter)
        min_iter = 1 if o["min_iter"] is None else as_int("min_iter", o["min_iter"])
        if min_iter > max_iter:
            raise ValueError(f"min_iter={min_iter} exceeds max_iter={max_iter}: no sample could stop by its "
                             f"criterion; raise max_iter or lower min_iter.")
        solver = o["solver"]
        if isinstance(other, Depth):
            if other.passes > max_iter:
                raise ValueError(f"Depth(passes={other.passes}) asks for more passes than max_iter={max_iter}: "
                                 f"raise max_iter to at least {other.passes}.")
            if solver == defaults["solver"]:   # (a looped model runs its block plainly: f^K(z0))
                solver = "fixed_point"
        shown = dict(o, atol=atol, rtol=rtol, max_iter=max_iter, min_iter=None if o["min_iter"] is None else min_iter)
        return cls(make_solver(solver), rule, other, max_iter, halting, backward, record, every,
                   correction, min_iter, shown)

    def replace(self, **changes: Any) -> "Options":
        """A copy with some fields changed (already-normalised values)."""
        return dataclasses.replace(self, **changes)

    @property
    def per_sample(self) -> bool:
        """Whether each sample stops on its own (halting="sample")."""
        return self.halting == "sample"

    @property
    def done_code(self) -> int:
        """The status of a sample whose criterion held (`_rules.done_code`)."""
        return done_code(self.criterion)

    @property
    def path_passes(self) -> Tuple[int, ...]:
        """The passes whose iterates go to `sol.path` (fixed-point correction)."""
        return () if self.correction is None else self.correction.passes

    def describe(self) -> str:
        """The options in force, as `DEQ`'s repr shows them (the criterion's own tolerances)."""
        parts = [f"solver={self.given.get('solver', self.solver)!r}",
                 f"backward={self.given.get('backward', self.backward)!r}",
                 f"atol={self.rule.atol:g}", f"rtol={self.rule.rtol:g}", f"norm={self.rule.norm!r}",
                 f"max_iter={self.max_iter}", f"halting={self.halting!r}", f"check_every={self.check_every or 'auto'}"]
        if self.criterion is not None:
            parts.append(f"criterion={self.criterion!r}")
        if self.correction is not None:
            parts.append(f"correction={self.correction!r}")
        if self.min_iter > 1:
            parts.append(f"min_iter={self.min_iter}")
        if self.record:
            parts.append("record=True")
        return ", ".join(parts)


__all__ = ["Options", "SOLVE_DEFAULTS", "DEQ_DEFAULTS", "STREAM_DEFAULTS", "HALTINGS", "NORMS",
           "DEFAULT_CHECK_EVERY", "check_choice"]
