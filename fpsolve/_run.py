"""`Run`: one solve as the loops see it, which a gradient strategy runs (`Run.forward`)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Tuple, Union

from torch import Tensor

from ._criteria import PackedCriterion, Residual
from ._loop import BatchLoop, Map
from ._sample_loop import SampleLoop
from ._solution import Solution
from .solvers._base import Solver


@dataclass(frozen=True)
class Run:
    """One solve in the loop's layout: the map on packed tensors, its input, the start z0 and
    f(z0) (the first call, made by `solve`), and how to iterate. A gradient strategy runs it
    (`forward`), possibly with other settings (a recorded graph, a checkpointed map)."""

    fn: Map
    z0: Tensor
    x: Any
    fz0: Tensor
    solver: Solver
    rule: Residual
    max_iter: int
    per_sample: bool = True
    criterion: Optional[PackedCriterion] = None
    record: bool = False
    check_every: Optional[int] = 1   # None: looks placed by prediction (halting="sample")
    round_fn: Optional[Callable[[Tensor], Tensor]] = None
    path_passes: Tuple[int, ...] = field(default=())
    min_iter: int = 1
    frozen: Optional[Tensor] = None   # halting="batch": rows held DIVERGED at their start throughout

    def forward(self, **changes: Any) -> Solution:
        """Iterate to a Solution (z in the loop's layout), with some settings changed."""
        return self.loop(**changes).run()

    def loop(self, **changes: Any) -> Union[SampleLoop, BatchLoop]:
        """The loop that runs this solve (not started), with some settings changed."""
        run = replace(self, **changes) if changes else self
        settings = dict(run.__dict__)
        if run.per_sample:
            return SampleLoop(**settings)
        return BatchLoop(settings)


__all__ = ["Run"]
