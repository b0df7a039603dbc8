"""Timing machinery shared by the benchmarks: a timed f, the floor loop, runners, reports.

Overhead = wall time - time inside f (f is wrapped by `TimedF`), per loop iteration (per call
of f) and as a percentage of the f time. The floor is the minimal honest loop of BENCH.md.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TimedF:
    """Wraps f(z, x) (or f(z)), accumulating time inside it, calls and rows passed."""

    def __init__(self, f: Callable[..., Any], device: torch.device) -> None:
        self.f, self.cuda = f, device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0

    def __call__(self, z: torch.Tensor, *rest: Any) -> Any:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.f(z, *rest)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += z.shape[0]
        return out


def floor_loop(f: Callable[..., Any], z0: torch.Tensor, x: Any, rtol: float, max_iter: int) -> torch.Tensor:
    """Plain iteration with one per-sample residual check per pass and nothing else."""
    dims = tuple(range(1, z0.ndim))
    z = z0
    for _ in range(max_iter):
        fz = f(z, x)
        rn = torch.linalg.vector_norm(fz - z, dim=dims)
        fn = torch.linalg.vector_norm(fz, dim=dims)
        if (rn <= rtol * fn).all().item():
            return fz
        z = fz
    return z


@dataclass
class Sample:
    """One timed run."""

    wall: float
    f_seconds: float
    calls: int
    rows: int


@dataclass
class Row:
    problem: str
    dtype: str
    solver: str
    library: str
    f_rows: int
    iterations_mean: float
    iterations_max: int
    wall_ms: float
    wall_ms_min: float
    wall_ms_max: float
    overhead_us_per_iter: float
    overhead_x_floor: Optional[float]
    overhead_pct: float
    error: float
    converged_frac: float
    extra: Dict[str, Any] = field(default_factory=dict)


def time_runs(run: Callable[[], Any], timed: TimedF, repeats: int) -> List[Sample]:
    out = []
    for _ in range(repeats):
        timed.reset()
        t0 = time.perf_counter()
        run()
        if timed.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        out.append(Sample(wall, timed.seconds, timed.calls, timed.rows))
    return out


def summarise(samples: List[Sample]) -> Dict[str, float]:
    walls = [s.wall for s in samples]
    med = statistics.median(walls)
    # overhead from the run with the median wall time (f and overhead share the same noise)
    s = sorted(samples, key=lambda s: s.wall)[len(samples) // 2]
    over = max(s.wall - s.f_seconds, 0.0)
    return {
        "wall_ms": med * 1e3,
        "wall_ms_min": min(walls) * 1e3,
        "wall_ms_max": max(walls) * 1e3,
        "overhead_us_per_iter": over / max(s.calls, 1) * 1e6,
        "overhead_pct": 100.0 * over / max(s.f_seconds, 1e-12),
        "calls": s.calls,
        "rows": s.rows,
    }


def rel_error(z: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-sample relative error ||z - z*|| / ||z*|| against the reference."""
    dims = tuple(range(1, ref.ndim))
    d = torch.linalg.vector_norm(z.double() - ref, dim=dims)
    return float((d / torch.linalg.vector_norm(ref, dim=dims).clamp_min(1e-300)).max())


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def write_json(path: str, payload: Any) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
        fh.write("\n")
