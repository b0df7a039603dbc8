"""The old address of `diagnose`, `Flag` and `Report` (now in the private package
`fpsolve._diagnosis`; import them from `fpsolve`).

`_plain_run` keeps its old keyword signature for callers that test plain iteration directly
(tests/test_honest_status.py); new code calls `fpsolve._diagnosis.plain.plain_run`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._criteria import Residual
from ._diagnosis import Flag, Report, diagnose
from ._diagnosis.plain import Plain, PlainSetup, plain_run


def _plain_run(fn: Callable[[Tensor, Any], Tensor], z0: Tensor, x: Any, *, steps: int, max_period: int,
               atol: float, rtol: float, norm: str, per_sample: bool, gen: torch.Generator,
               precision: float) -> Plain:
    """`plain_run` with its options as keywords (the signature before the package)."""
    setup = PlainSetup(steps, max_period, Residual(atol, rtol, norm), per_sample, precision)
    return plain_run(fn, z0, x, setup, gen)


__all__ = ["Flag", "Report", "diagnose"]
