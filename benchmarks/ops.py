"""ATen ops dispatched per evaluation of f, outside f (shared/BENCH.md, "Count ops").

Op counts are deterministic: they do not depend on the machine's load, and on an accelerator
each counted op is a kernel launch (or a host sync), so they measure a loop's bookkeeping
where wall time on a shared CPU cannot.

How the count is taken: a `TorchDispatchMode` sees every ATen op that reaches the Python
dispatch key while the solve runs. f is wrapped so that its calls raise a pause counter that
the mode checks: f's own ops still pass through the mode, which only forwards them, so f runs
exactly as without the mode (nothing is popped from the mode stack, no dispatch key is
disabled for f: a tensor subclass or another mode inside f behaves the same), and the pause
is released in a `finally`, so an exception in f cannot leave the count paused. Views are not
counted: ops whose schema says the output aliases an input without writing it
(`OpOverload.is_view`: view, reshape's alias, transpose, select, slice, expand, unsqueeze,
detach, unbind, ...), and `_unsafe_view` (an alias by construction). They launch no kernel.
Everything else outside f counts, host syncs (`_local_scalar_dense`: `.item()`, `bool()`)
and allocations (`empty`, `zeros`) included. The total over the whole solve is divided by the
number of f calls (the first evaluation, at z0, included).

The floor is the minimal honest loop of BENCH.md (`harness.floor_loop`): `z = f(z, x)` with
two per-sample norms and one all-halted test per pass.

    python benchmarks/ops.py                 # mlp_contractive, float32
    python benchmarks/ops.py --by-op         # the ops of each, most frequent first
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections import Counter
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fpsolve

HERE = os.path.dirname(os.path.abspath(__file__))


def _sibling(name: str) -> ModuleType:
    """A module of benchmarks/, loaded by its path under a private name (tests/ has a
    `problems` module of its own, so a test importing this file must not get that one)."""
    key = f"_fpsolve_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(HERE, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[key]


problems = _sibling("problems")
floor_loop = _sibling("harness").floor_loop
Problem, build = problems.Problem, problems.build

SOLVERS = ("floor", "fixed_point", "anderson", "broyden")
TORCHDEQ_NAMES = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
RTOL = 1e-4   # fpsolve.solve's default rtol


def is_alias(func: Any) -> bool:
    """Whether an op only makes an alias of its input (no kernel, nothing written)."""
    return bool(getattr(func, "is_view", False)) or func is torch.ops.aten._unsafe_view.default


class OpCounter(TorchDispatchMode):
    """Counts the non-view ATen ops dispatched outside the functions wrapped by `pause`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = 0
        self.calls = 0
        self.steps: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.paused and not is_alias(func):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def pause(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """f, its calls counted and its ops not."""
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.paused += 1
            try:
                return f(*args, **kwargs)
            finally:
                self.paused -= 1
        return wrapped

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def mlp_contractive(width: int = 256, batch: int = 64, dtype: torch.dtype = torch.float32) -> Problem:
    """BENCH.md's problem 1 (benchmarks/problems.py, the same construction and seed) at
    another width and batch: a small one keeps a test fast."""
    saved = problems.WIDTH, problems.BATCH
    problems.WIDTH, problems.BATCH = width, batch
    try:
        return build("mlp_contractive", dtype)
    finally:
        problems.WIDTH, problems.BATCH = saved


class StepCounts:
    """A solver wrapped so that the ops of each of its `step` calls are recorded (`.steps`,
    one entry per call, the loop's own ops excluded); everything else is the solver's."""

    def __init__(self, solver: Any, counter: OpCounter) -> None:
        self.solver, self.counter, self.steps = solver, counter, []

    def init(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> Any:
        return self.solver.init(z, fz, g)

    def step(self, state: Any, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor, k: Any) -> Any:
        before = self.counter.total
        out = self.solver.step(state, z, fz, g, k)
        self.steps.append(self.counter.total - before)
        return out

    def __getattr__(self, name: str) -> Any:   # compact, per_row, ...
        return getattr(self.solver, name)


SOLVER_OBJECTS = {"fixed_point": fpsolve.FixedPointIteration, "anderson": fpsolve.Anderson, "broyden": fpsolve.Broyden}


def _runner(solver: Any, p: Problem, counter: OpCounter, rtol: float) -> Callable[[], Any]:
    f = counter.pause(p.f)
    if solver == "floor":
        return lambda: floor_loop(f, p.z0, p.x, rtol, p.max_iter)
    if isinstance(solver, str) and solver.startswith("torchdeq/"):
        from torchdeq.solver import get_solver   # (optional: the dev extra)
        fn = get_solver(TORCHDEQ_NAMES[solver.partition("/")[2]])
        return lambda: fn(lambda z: f(z, p.x), p.z0, max_iter=p.max_iter, tol=rtol, stop_mode="rel")
    wrapped = StepCounts(SOLVER_OBJECTS[solver]() if isinstance(solver, str) else solver, counter)
    counter.steps = wrapped.steps
    return lambda: fpsolve.solve(f, p.z0, p.x, solver=wrapped, halting="sample", rtol=rtol,
                                 max_iter=p.max_iter, backward="none")


def count_ops(solver: Any, problem: Union[str, Problem], dtype: torch.dtype = torch.float32,
              rtol: float = RTOL) -> OpCounter:
    """Run one solve of `problem` (a name of benchmarks/problems.py, or a Problem) and return
    its counter: `.ops` by op name, `.total`, `.calls` (evaluations of f) and, for fpsolve,
    `.steps` (the ops of each solver step). `solver`: "floor", a solver name or object for
    `fpsolve.solve` (halting="sample", the default rtol), or "torchdeq/<fixed_point|anderson|broyden>".

    The solve runs twice and the second run is counted: the first fills the caches a solve
    keeps across calls (the loop's constant tensors), as in a model that solves every batch."""
    p = build(problem, dtype) if isinstance(problem, str) else problem
    counter = OpCounter()
    run = _runner(solver, p, counter, rtol)
    with torch.no_grad():
        run()
        counter.calls = 0
        counter.steps.clear()
        with counter:
            run()
    return counter


def ops_per_call(solver: Union[str, Any], problem: Union[str, Problem] = "mlp_contractive",
                 dtype: torch.dtype = torch.float32, rtol: float = RTOL) -> float:
    """ATen ops dispatched outside f per evaluation of f, for one solve (deterministic)."""
    c = count_ops(solver, problem, dtype, rtol)
    return c.total / c.calls


def main(argv: Optional[list] = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="mlp_contractive")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--by-op", action="store_true", help="list each solver's ops")
    ap.add_argument("--steps", action="store_true", help="print the ops of each solver step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    names = list(SOLVERS)
    try:
        import torchdeq  # noqa: F401
        names += [f"torchdeq/{s}" for s in TORCHDEQ_NAMES]
    except ImportError:
        pass
    out = {}
    print(f"ATen ops outside f per f call: {args.problem}, {args.dtype}, rtol {RTOL}, halting='sample'")
    for s in names:
        c = count_ops(s, args.problem, dtype)
        out[s] = c.total / c.calls
        print(f"{s:22s} {out[s]:6.2f}   ({c.total} ops, {c.calls} f calls)")
        if args.steps and c.steps:
            print(f"    ops per step: {c.steps}")
        if args.by_op:
            for op, n in c.ops.most_common():
                print(f"    {n:6d}  {op}")
    return out


if __name__ == "__main__":
    main()
