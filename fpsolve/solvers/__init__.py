"""Solvers: small frozen objects that propose the next iterate (see `_base.Solver`), and the
registry that turns a name into one."""
from typing import Any, Callable, Dict, Union

from ._base import Solver, State, compact
from .anderson import Anderson
from .broyden import Broyden
from .fixed_point import FixedPointIteration

#: The names `solver=` accepts, each building the solver with its defaults.
SOLVERS: Dict[str, Callable[[], Solver]] = {
    "fixed_point": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
}


def make_solver(solver: Union[str, Solver, Any]) -> Solver:
    """A solver object from a name or an object that has `init` and `step`."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"solver={solver!r} is not known; use one of {sorted(SOLVERS)} or a solver "
                f"object such as fpsolve.Anderson(m=5)."
            )
        return SOLVERS[solver]()
    if isinstance(solver, type):
        raise TypeError(
            f"solver={solver.__name__} is a class; pass an instance, e.g. {solver.__name__}()."
        )
    if not (callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None))):
        raise TypeError(
            f"solver must be one of {sorted(SOLVERS)} or an object with init() and step() "
            f"(see fpsolve.solvers.Solver); got {solver!r}."
        )
    return solver


__all__ = ["Solver", "State", "compact", "Anderson", "Broyden", "FixedPointIteration", "SOLVERS", "make_solver"]
