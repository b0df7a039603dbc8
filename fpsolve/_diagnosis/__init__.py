"""`fpsolve.diagnose` and its report, one concern per module:

- `entry`: the argument checks and the run (solve, measure, decide, report);
- `report`: `Flag`, `Report`, their messages, text and colours;
- `plain`: plain iteration from z0, with the solve's own residual rule and divergence limit;
- `linear` and `spectral`: the Krylov analysis at the returned point;
- `restarts`: more solves from other points (a second attractor);
- `verdict`: the flags, a pure function of the measured numbers;
- `keep`: f's modules restored as they were found;
- `plot`: figures of a finished report (imports `report` only; matplotlib is optional).

The package is private (`fpsolve.diagnose` is the function); its names are imported from here.
"""
from .entry import diagnose
from .report import Flag, Report

__all__ = ["diagnose", "Flag", "Report"]
