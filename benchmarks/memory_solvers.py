"""Peak memory of the solvers, in state-sized buffers ([B, width] of the state's dtype).

    python benchmarks/memory_solvers.py [--batch 100000] [--width 64] [--steps 12]

Each figure is the peak resident memory (VmHWM, reset through /proc/self/clear_refs) above
what was resident before the phase, divided by the bytes of one state buffer. The script
re-runs itself with MALLOC_MMAP_THRESHOLD_ set, so that every large tensor is its own
mapping and is returned to the system when freed: resident memory then tracks live tensors
(torch's CPU allocator has no peak counter; tracemalloc does not see its allocations).

Two phases per solver, on f(z, x) = tanh(z W + x) (float32):
  step   a minimal driver (fz = f(z, x); g = fz - z; z = step(...)), which holds z, fz, g and
         f's own temporaries; its plain-iteration row is the floor, and `solver` = step - floor
         is what the solver itself adds (state + the step's temporaries at their peak);
  solve  fpsolve.solve(..., backward="none") with the same budget (adds the loop's best-iterate
         and halting bookkeeping; nothing halts within the budget at rtol 1e-30);
  halting fpsolve.solve on tanh(c_i z W + x), c_i from 0.05 to 0.95 across the batch, rtol
         1e-4, 30 iterations: rows halt at different iterations, so the loop drops rows from
         the solver's state (`compact`) again and again.
No timing is taken. Linux only.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Dict

import torch

import fpsolve

ENV = "MALLOC_MMAP_THRESHOLD_"


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_above(fn: Callable[[], object]) -> int:
    """Bytes of peak resident memory above the resident memory before fn() ran."""
    with open("/proc/self/clear_refs", "w") as fh:   # reset VmHWM to the current RSS
        fh.write("5")
    before = _status("VmRSS")
    out = fn()
    peak = _status("VmHWM")
    del out
    return peak - before


SOLVERS: Dict[str, Callable[[], object]] = {
    "fixed_point": lambda: fpsolve.FixedPointIteration(),
    "anderson (m=5)": lambda: fpsolve.Anderson(),
    "anderson (m=5, safeguard=False)": lambda: fpsolve.Anderson(safeguard=False),
    "broyden (memory=15)": lambda: fpsolve.Broyden(),
    "broyden (memory=15, line_search=False)": lambda: fpsolve.Broyden(line_search=False),
}


def measure(batch: int, width: int, steps: int) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    w = torch.randn(width, width) / width ** 0.5 * 0.9
    x = torch.randn(batch, width)
    z0 = torch.zeros(batch, width)
    unit = z0.numel() * z0.element_size()
    f = lambda z, x: torch.tanh(torch.addmm(x, z, w))  # noqa: E731
    f(z0, x)   # (warm up: the first call's one-off allocations are not the solver's)
    c = torch.linspace(0.05, 0.95, batch)[:, None]
    f_mixed = lambda z, xc: torch.tanh(xc[1] * (z @ w) + xc[0])  # noqa: E731

    def drive(solver) -> object:
        z = z0
        state = None
        for k in range(steps):
            fz = f(z, x)
            g = fz - z
            if state is None:
                state = solver.init(z, fz, g)
            z, state = solver.step(state, z, fz, g, k)
        return state

    out: Dict[str, Dict[str, float]] = {}
    with torch.no_grad():
        for name, make in SOLVERS.items():
            step = peak_above(lambda: drive(make())) / unit
            solve = peak_above(lambda: fpsolve.solve(f, z0, x, solver=make(), rtol=1e-30,
                                                     max_iter=steps, backward="none")) / unit
            halting = peak_above(lambda: fpsolve.solve(f_mixed, z0, (x, c), solver=make(), rtol=1e-4,
                                                       max_iter=30, backward="none")) / unit
            out[name] = {"step": step, "solve": solve, "halting": halting}
    floor = out["fixed_point"]
    for row in out.values():
        row["solver"] = row["step"] - floor["step"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="steps per phase (> Anderson's m)")
    args = ap.parse_args(argv)
    if os.environ.get(ENV) is None:   # re-run with a fixed mmap threshold (see the docstring)
        env = dict(os.environ, **{ENV: "65536"})
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    torch.set_num_threads(1)
    res = measure(args.batch, args.width, args.steps)
    print(f"B = {args.batch}, width {args.width}, float32, {args.steps} steps; torch {torch.__version__}; "
          f"one state buffer = {args.batch * args.width * 4 / 2**20:.1f} MiB")
    print(f"{'solver':40} {'driver peak':>12} {'solver adds':>12} {'solve peak':>11} {'halting peak':>13}"
          "   (state-sized buffers)")
    for name, row in res.items():
        print(f"{name:40} {row['step']:12.1f} {row['solver']:12.1f} {row['solve']:11.1f} {row['halting']:13.1f}")


if __name__ == "__main__":
    main()
