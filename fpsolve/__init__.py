"""fpsolve: fixed points of deep-equilibrium models and looped networks, halting per sample.

Everything public is imported here; the modules behind it are private.
"""
from ._carry import Carry, CarryStep
from ._correction import Correction
from ._criteria import Depth, HaltHead, OutputKL, Residual, Stable
from ._backward import Implicit, Phantom, Unroll
from ._implicit import ConvergenceWarning
from ._deq import DEQ, jacobian_penalty
from ._diagnosis import Flag, Report, diagnose
from .norms import frobenius_bound, lipschitz_bounds, spectral_bound
from .blocks import LoopedTransformerBlock, SharedDropout
from ._solution import Solution, Status
from ._solve import solve
from ._looped_lm import KVCache, LoopedLM
from ._generate import Generation, generate
from ._stream import StreamResult, solve_stream, stream
from .solvers import Anderson, Broyden, FixedPointIteration, Solver

__version__ = "0.1.0"

__all__ = [
    "solve",
    "stream",
    "solve_stream",
    "StreamResult",
    "Solution",
    "Status",
    "Solver",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "Residual",
    "Stable",
    "OutputKL",
    "HaltHead",
    "Depth",
    "Carry",
    "CarryStep",
    "Implicit",
    "Phantom",
    "Unroll",
    "Correction",
    "ConvergenceWarning",
    "DEQ",
    "jacobian_penalty",
    "LoopedTransformerBlock",
    "SharedDropout",
    "LoopedLM",
    "KVCache",
    "generate",
    "Generation",
    "diagnose",
    "Flag",
    "Report",
    "spectral_bound",
    "frobenius_bound",
    "lipschitz_bounds",
]
