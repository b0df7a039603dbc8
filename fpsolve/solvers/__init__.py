"""Solvers: small frozen objects that propose the next iterate (see `_base.Solver`)."""
from ._base import Solver, State, compact
from .anderson import Anderson
from .broyden import Broyden
from .fixed_point import FixedPointIteration

__all__ = ["Solver", "State", "compact", "Anderson", "Broyden", "FixedPointIteration"]
