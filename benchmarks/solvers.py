"""Forward solves: fpsolve vs torchdeq vs the floor on BENCH.md problems 1-4, in one run.

Criterion: fpsolve halts a sample when ||f(z)-z|| <= rtol ||f(z)|| (atol = 0); torchdeq runs
with stop_mode="rel", tol=rtol, which is the same per-sample quantity but stops the whole batch
when its worst sample meets it. Both start from zeros with the same budget. The error column is
the largest per-sample relative distance to a float64 reference solved to rtol 1e-12.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

import fpsolve
from harness import Row, Sample, TimedF, floor_loop, rel_error, summarise
from problems import PROBLEMS, build

SOLVERS = ("fixed_point", "anderson", "broyden")
TORCHDEQ_NAMES = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def reference(name: str) -> torch.Tensor:
    p = build(name, torch.float64)
    with torch.no_grad():
        sol = fpsolve.solve(p.f, p.z0, p.x, solver=fpsolve.Anderson(m=8), rtol=1e-12, max_iter=3000)
    if not bool(sol.converged.all()):
        raise RuntimeError(f"the float64 reference for {name} did not converge: {sol}")
    return sol.z


def runners(name: str, dtype: torch.dtype, rtol: float) -> Tuple[Dict[str, Callable[[], Any]], TimedF, Any]:
    p = build(name, dtype)
    timed = TimedF(p.f, p.z0.device)
    run: Dict[str, Callable[[], Any]] = {
        "floor": lambda: floor_loop(timed, p.z0, p.x, rtol, p.max_iter),
    }
    for s in SOLVERS:
        run[f"fpsolve/{s}"] = (lambda s=s: fpsolve.solve(
            timed, p.z0, p.x, solver=s, rtol=rtol, max_iter=p.max_iter, backward="none"))
    try:
        from torchdeq.solver import get_solver
    except ImportError:  # the comparison is optional outside the dev extra
        get_solver = None
    if get_solver is not None:
        for s in SOLVERS:
            solver_fn = get_solver(TORCHDEQ_NAMES[s])
            run[f"torchdeq/{s}"] = (lambda fn=solver_fn: fn(
                lambda z: timed(z, p.x), p.z0, max_iter=p.max_iter, tol=rtol, stop_mode="rel"))
    return run, timed, p


def bench_problem(name: str, dtype: torch.dtype, rtol: float, repeats: int, ref: torch.Tensor) -> List[Row]:
    run, timed, p = runners(name, dtype, rtol)
    samples: Dict[str, List[Sample]] = {k: [] for k in run}
    results: Dict[str, Any] = {}
    with torch.no_grad():
        for k, fn in run.items():   # warm-up
            fn()
        for _ in range(repeats):    # alternate libraries within each repeat
            for k, fn in run.items():
                timed.reset()
                t0 = time.perf_counter()
                results[k] = fn()
                wall = time.perf_counter() - t0
                samples[k].append(Sample(wall, timed.seconds, timed.calls, timed.rows))
    floor = summarise(samples["floor"])
    dt = str(dtype).replace("torch.", "")
    rows: List[Row] = []
    for k in run:
        lib, _, solver = k.partition("/")
        st = summarise(samples[k])
        res = results[k]
        if lib == "floor":
            z, it_mean, it_max = res, float(st["calls"]), int(st["calls"])
            dims = tuple(range(1, z.ndim))
            fz = p.f(z, p.x)
            conv = float((torch.linalg.vector_norm(fz - z, dim=dims)
                          <= rtol * torch.linalg.vector_norm(fz, dim=dims)).float().mean())
            solver = "plain loop"
        elif lib == "fpsolve":
            z = res.z
            it = res.iterations.double()
            it_mean, it_max = float(it.mean()), int(it.max())
            conv = float(res.converged.double().mean())
        else:
            z, _, info = res
            it_mean, it_max = float(st["calls"]), int(st["calls"])
            conv = float((info["rel_lowest"] <= rtol).double().mean())
        rows.append(Row(
            problem=name, dtype=dt, solver=solver, library=lib, f_rows=int(st["rows"]),
            iterations_mean=it_mean, iterations_max=it_max, wall_ms=st["wall_ms"],
            wall_ms_min=st["wall_ms_min"], wall_ms_max=st["wall_ms_max"],
            overhead_us_per_iter=st["overhead_us_per_iter"],
            overhead_x_floor=st["overhead_us_per_iter"] / max(floor["overhead_us_per_iter"], 1e-9),
            overhead_pct=st["overhead_pct"], error=rel_error(z, ref), converged_frac=conv,
        ))
    return rows


def main(argv: List[str] | None = None) -> List[Row]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--float64", nargs="*", default=["mlp_contractive", "mlp_hard"],
                    help="problems also run in float64")
    args = ap.parse_args(argv)
    rows: List[Row] = []
    for name in args.problems:
        ref = reference(name)
        dtypes = [torch.float32] + ([torch.float64] if name in args.float64 else [])
        for dtype in dtypes:
            new = bench_problem(name, dtype, args.rtol, args.repeats, ref)
            for r in new:
                print(f"{r.problem:16s} {r.dtype:8s} {r.library:8s} {r.solver:12s} rows {r.f_rows:6d} "
                      f"it {r.iterations_mean:6.1f}/{r.iterations_max:4d} wall {r.wall_ms:8.2f} ms "
                      f"over {r.overhead_us_per_iter:7.1f} us/it ({r.overhead_x_floor:5.2f}x floor) "
                      f"err {r.error:.1e} conv {r.converged_frac:.2f}", flush=True)
            rows += new
    return rows


if __name__ == "__main__":
    main()
