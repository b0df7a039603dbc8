"""Figures for `fpsolve.diagnose` reports (matplotlib is an optional extra: `pip install fpsolve[plot]`).

The functions live in `fpsolve._diagnosis.plot`; this public module keeps their old address.
"""
from ._diagnosis.plot import plot_report
from ._diagnosis.report import HEALTHY_COLOR, flag_colors

__all__ = ["plot_report", "flag_colors", "HEALTHY_COLOR"]
