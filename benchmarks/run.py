"""Run every benchmark and write docs/benchmarks.md and docs/benchmarks.json (`make bench`).

docs/benchmarks.json: {"problems": rows of problems 1-6, "looped_lm": problem 7}.

    python benchmarks/run.py [--repeats 7] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import backward  # noqa: E402
import lm_decoding  # noqa: E402
import ops  # noqa: E402
import solvers  # noqa: E402
import stream  # noqa: E402
from harness import ROOT, Row, git_rev, loadavg, machine, write_json  # noqa: E402

TARGET_X_FLOOR = {"fixed_point": 1.5, "anderson": 4.0, "broyden": 10.0}


def _find(rows: List[Row], problem: str, dtype: str, solver: str, library: str) -> Optional[Row]:
    for r in rows:
        if (r.problem, r.dtype, r.solver, r.library) == (problem, dtype, solver, library):
            return r
    return None


def table(rows: List[Row]) -> List[str]:
    out = [
        "| problem | dtype | solver | library | f rows | iterations (mean/max) | wall ms (median [min, max]) "
        "| overhead µs/iter (× floor) | overhead % | error vs reference | converged |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.problem} | {r.dtype} | {r.solver} | {r.library} | {r.f_rows} | "
            f"{r.iterations_mean:.1f} / {r.iterations_max} | {r.wall_ms:.2f} [{r.wall_ms_min:.2f}, {r.wall_ms_max:.2f}] | "
            f"{r.overhead_us_per_iter:.0f} ({r.overhead_x_floor:.2f}×) | {r.overhead_pct:.0f}% | "
            f"{r.error:.1e} | {r.converged_frac:.2f} |"
        )
    return out


def ratios(rows: List[Row]) -> Tuple[List[str], List[str]]:
    """Per problem and solver: fpsolve / torchdeq wall and rows; and the target checks."""
    lines, checks = [], []
    keys = sorted({(r.problem, r.dtype) for r in rows}, key=lambda k: [r.problem for r in rows].index(k[0]))
    for problem, dtype in keys:
        parts = []
        for s in solvers.SOLVERS:
            a, b = _find(rows, problem, dtype, s, "fpsolve"), _find(rows, problem, dtype, s, "torchdeq")
            if a is None:
                continue
            if b is not None:
                parts.append(f"{s}: wall {a.wall_ms / b.wall_ms:.2f}×, f rows {a.f_rows / b.f_rows:.2f}×, "
                             f"iterations (max) {a.iterations_max} vs {b.iterations_max}")
            if dtype == "float32":
                ok = a.overhead_x_floor is not None and a.overhead_x_floor <= TARGET_X_FLOOR[s]
                checks.append(f"| {problem} | {s} | overhead ≤ {TARGET_X_FLOOR[s]}× floor | "
                              f"{a.overhead_x_floor:.2f}× | {'met' if ok else '**not met**'} |")
                if b is not None:
                    ok = a.iterations_max <= b.iterations_max + 1
                    checks.append(f"| {problem} | {s} | iterations ≤ torchdeq's + 1 | "
                                  f"{a.iterations_max} vs {b.iterations_max} | {'met' if ok else '**not met**'} |")
                    if problem == "mixed_batch":
                        for what, va, vb in (("f rows", a.f_rows, b.f_rows), ("wall", a.wall_ms, b.wall_ms)):
                            ok = va <= 0.5 * vb
                            checks.append(f"| {problem} | {s} | {what} ≤ 0.5× torchdeq | {va / vb:.2f}× | "
                                          f"{'met' if ok else '**not met**'} |")
                    if a.converged_frac < 1.0 or b.converged_frac < 1.0:
                        checks.append(f"| {problem} | {s} | converged fraction | fpsolve {a.converged_frac:.2f}, "
                                      f"torchdeq {b.converged_frac:.2f} | {'met' if a.converged_frac >= b.converged_frac else '**not met**'} |")
        if parts:
            lines.append(f"- **{problem}** ({dtype}), fpsolve / torchdeq: " + "; ".join(parts))
    return lines, checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 repeats, float32 only (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    load_before = loadavg()
    argv = ["--repeats", str(repeats)] + (["--float64"] if args.quick else [])
    rows = solvers.main(argv)
    load_after = loadavg()
    op_counts = {p: ops.main(["--problem", p]) for p in ("mlp_contractive",)}
    torch.set_num_threads(args.threads)
    bw_rows, bw_lines = backward.main(["--repeats", str(repeats)] + ([] if args.quick else ["--float64"]))
    # Problem 6 (halting in wall time) runs on 1 thread: its small f is the per-call-cost case.
    torch.set_num_threads(1)
    st_results = [stream.measure(stream.build(n, args.quick), 3 if args.quick else (5 if n == "maze" else 15))
                  for n in stream.STREAMS]
    lm_result, lm_lines = lm_decoding.main(["--quick"] if args.quick else [])
    torch.set_num_threads(args.threads)
    meta = machine()
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    lines = [
        "# Benchmarks",
        "",
        f"Made by `{cmd.strip()}` (`make bench`) on {meta['date']}, commit {git_rev()}.",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, Python {meta['python']}, "
        f"`torch.set_num_threads({meta['threads']})`, CPU only. Load average before {load_before}, after {load_after}.",
        "",
        "Protocol (`shared/BENCH.md`): every problem is run by fpsolve, torchdeq and the *floor* "
        "(plain iteration with one per-sample residual check per pass) in the same process, "
        f"alternating, after a warm-up; figures are the median of {repeats} repeats with [min, max]. "
        "Overhead is wall time minus the time spent inside f (f is wrapped by a timer), per loop "
        "iteration, and as a multiple of the floor's overhead measured in the same run.",
        "",
        "Criterion: fpsolve halts each sample when ||f(z) − z|| ≤ rtol·||f(z)|| (atol = 0, rtol = 1e-4); "
        "torchdeq runs with `stop_mode='rel', tol=1e-4`, the same per-sample quantity, but stops the "
        "whole batch when its worst sample meets it. Both start from zeros with the same budget. "
        "*error* is the largest per-sample relative distance ||z − z*|| / ||z*|| to a float64 "
        "reference solved to rtol 1e-12. torchdeq returns f(z), one step past the iterate it measured, "
        "so at the same tolerance its error can be a little smaller; fpsolve returns the iterate whose "
        "residual it reports. *iterations* for torchdeq and the floor are the passes every sample received.",
        "",
    ]
    for name in solvers.PROBLEMS:
        from problems import build
        lines.append(f"- `{name}`: {build(name, torch.float32).description}")
    lines += ["", "## Results", ""] + table(rows)
    rlines, checks = ratios(rows)
    lines += ["", "## fpsolve / torchdeq, same run", ""] + rlines
    lines += ["", "## Targets (issue 3, CPU float32)", "", "| problem | solver | target | measured | |", "|---|---|---|---|---|"] + checks
    lines += ["", "## ATen ops outside f per f call (deterministic; `python benchmarks/ops.py`)", "",
              "Every op a solve dispatches outside f, views excluded, divided by the f calls (mlp_contractive, "
              "float32, halting='sample'); on an accelerator each is a kernel launch. Goals (BENCH.md): "
              "fixed-point ≤ the floor, Anderson ≤ 16, Broyden ≤ 20.", "",
              "| solver | ops per f call |", "|---|---:|"]
    lines += [f"| {s} | {v:.2f} |" for s, v in op_counts["mlp_contractive"].items()]
    lines += [""] + bw_lines + [""]
    lines += ["## Problem 6: halting in wall time (streams of mixed difficulty, 1 thread)", "",
              "Least wall time of " + ("3" if args.quick else "15 (maze: 5)") + " alternating rounds per method; "
              "*occupancy* is rows per call ÷ slots. The *oracle fixed depth* runs every batch for the "
              "K passes the hardest sample needs, with no checks; the *ideal* is that time × Σ "
              "iterations ÷ (N·K). f calls are what an accelerator pays below its saturation, f rows "
              "what a CPU pays on large tensors.", ""] + stream.markdown(st_results)
    lines += ["", lm_decoding.SECTION, ""] + lm_lines
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), "w") as fh:
        fh.write("\n".join(lines))
    payload: List[Dict] = []
    for r in rows:
        d = asdict(r)
        d.pop("extra", None)
        payload.append(d)
    for r in bw_rows:   # the backward problem's rows, with the keys they have
        payload.append(dict(r, problem="backward"))
    for r in st_results:
        payload.append(dict(r, problem="stream_" + r["name"]))
    payload.append({"problem": "ops_per_f_call_mlp_contractive", **op_counts["mlp_contractive"]})
    # problems 1-6 as rows under "problems"; problem 7 under its own key (BENCH.md)
    write_json(os.path.join(ROOT, "docs", "benchmarks.json"), {"problems": payload, "looped_lm": lm_result})
    print("\n".join(rlines + checks))


if __name__ == "__main__":
    main()
