"""Halting as root-finding on a looped transformer: fixed-point halting vs fixed depth vs ACT.

    python examples/halting_study.py --quick      # one seed, small sets, <= 5 min on 2 CPU cores
    python examples/halting_study.py              # 3 seeds + ablations; writes docs/halting.json

The study itself is the package examples/halting/ (its docstring describes the task, the
model, the training and the rules); this file is its command.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from halting.main import main  # noqa: E402

if __name__ == "__main__":
    main()
