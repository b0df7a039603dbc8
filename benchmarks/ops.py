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
import os
import sys
from collections import Counter
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fpsolve  # noqa: E402
from harness import floor_loop  # noqa: E402
from problems import Problem, build  # noqa: E402

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


def _runner(solver: str, p: Problem, f: Callable[..., Any], rtol: float) -> Callable[[], Any]:
    if solver == "floor":
        return lambda: floor_loop(f, p.z0, p.x, rtol, p.max_iter)
    if solver.startswith("torchdeq/"):
        from torchdeq.solver import get_solver   # (optional: the dev extra)
        fn = get_solver(TORCHDEQ_NAMES[solver.partition("/")[2]])
        return lambda: fn(lambda z: f(z, p.x), p.z0, max_iter=p.max_iter, tol=rtol, stop_mode="rel")
    return lambda: fpsolve.solve(f, p.z0, p.x, solver=solver, halting="sample", rtol=rtol,
                                 max_iter=p.max_iter, backward="none")


def count_ops(solver: Union[str, Any], problem: Union[str, Problem], dtype: torch.dtype = torch.float32,
              rtol: float = RTOL) -> OpCounter:
    """Run one solve of `problem` (a name of benchmarks/problems.py, or a Problem) and return
    its counter (`.ops` by op name, `.total`, `.calls`). `solver`: "floor", a solver name or
    object for `fpsolve.solve`, or "torchdeq/<fixed_point|anderson|broyden>"."""
    p = build(problem, dtype) if isinstance(problem, str) else problem
    counter = OpCounter()
    run = (_runner(solver, p, counter.pause(p.f), rtol) if isinstance(solver, str)
           else (lambda: fpsolve.solve(counter.pause(p.f), p.z0, p.x, solver=solver, halting="sample",
                                       rtol=rtol, max_iter=p.max_iter, backward="none")))
    with torch.no_grad():
        run()   # warm-up: caches (constants, lazy imports) are filled outside the count
        counter.calls = 0
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
        if args.by_op:
            for op, n in c.ops.most_common():
                print(f"    {n:6d}  {op}")
    return out


if __name__ == "__main__":
    main()
