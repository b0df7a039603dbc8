"""Problem 6 of BENCH.md: halting in wall time on streams of mixed difficulty.

Each stream goes through: the oracle fixed depth (every batch runs K passes, K = the most any
sample needs, no checks), `solve` with halting="batch" and "sample" (batch by batch), and
`solve_stream` (eager, and with f compiled by torch.compile; compile time reported apart).
Reported per method: samples/s, f calls, f rows, occupancy (rows per call / slots), and the
limits (rows >= sum of iterations; calls >= sum of iterations / slots), plus the ideal: the
fixed-depth time x sum of iterations / (N K), i.e. halting whose bookkeeping is free.

Streams: "mlp", "transformer" (random blocks) and "maze": the halting study's looped transformer
(checkpoint benchmarks/data/maze_loop.pt, made by benchmarks/train_maze_checkpoint.py) on 8x8
mazes padded with walls to 16x16 and 16x16 mazes, so every row is 256 tokens. Its 32 slots: on
its 512 mazes (mean 18.7 passes, most 45) 32 slots need 348 f calls (goal <= 389) and 11136 rows
(1.16x the passes); 16 slots need 672 calls, 64 slots waste 1.28x rows on the tail.
`--verify` times nothing: it checks stream == solve(halting="sample") per sample and accuracy.

    python benchmarks/stream.py [--repeats 7] [--threads 1] [--quick] [--streams maze] [--verify]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import fpsolve  # noqa: E402
from maze import WALL, generate  # noqa: E402
from train_maze_checkpoint import CHECKPOINT as MAZE_CHECKPOINT, load as load_maze  # noqa: E402

STREAMS = ("mlp", "transformer", "maze")


class Counted:
    """f with call and row counters (no timers: the stream benchmark times whole runs)."""

    def __init__(self, f: Callable[..., Any]) -> None:
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, z: torch.Tensor, x: Any) -> torch.Tensor:
        self.calls += 1
        self.rows += z.shape[0]
        return self.f(z, x)


class MixedMLP(nn.Module):
    """z -> tanh(c_i W z + x_i): W symmetric, spectral radius 1; c_i per sample in x."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        super().__init__()
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        w = q @ torch.diag(torch.linspace(-1.0, 1.0, n, dtype=torch.float64)) @ q.t()
        self.register_buffer("wt", w.float().t().contiguous())

    def forward(self, z: torch.Tensor, x: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xi, c = x
        return torch.tanh(c * (z @ self.wt) + xi)


class SmallBlock(nn.Module):
    """A small pre-norm transformer block as a looped map: c_i * tanh(block(z + x)) + x."""

    def __init__(self, d: int, heads: int, gen: torch.Generator) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))

    def forward(self, z: torch.Tensor, x: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xi, c = x
        h = z + xi
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return c.view(-1, 1, 1) * torch.tanh(h) + xi


@dataclass
class Stream:
    """One benchmark stream: f(z, x), its per-sample data x (a tuple of batch-first tensors, handed
    to f as one tuple per batch) and the solve settings; `batch` is both the batch size of the
    batch-by-batch methods and the stream's slots. Optional: `readout(z, x)` -> per-sample answers,
    `labels` the right ones, `groups` named sample masks to report accuracy on."""

    name: str
    description: str
    f: nn.Module
    x: Tuple[torch.Tensor, ...]
    batch: int
    rtol: float
    max_iter: int
    norm: str = "l2"
    readout: Optional[Callable[[torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]] = None
    labels: Optional[torch.Tensor] = None
    groups: Optional[Dict[str, torch.Tensor]] = None

    @property
    def N(self) -> int:
        return self.x[0].shape[0]

    def batches(self) -> List[Tuple[torch.Tensor, ...]]:
        return [tuple(t[i:i + self.batch] for t in self.x) for i in range(0, self.N, self.batch)]

    def accuracy(self, z: torch.Tensor) -> Dict[str, float]:
        """Share of samples whose whole answer is right, per group (needs readout and labels)."""
        if self.readout is None or self.labels is None:
            return {}
        right = (self.readout(z, self.x) == self.labels).flatten(1).all(1)
        groups = self.groups or {"all": torch.ones_like(right)}
        return {g: float(right[m].float().mean()) for g, m in groups.items()}


def pad_mazes(cells: np.ndarray, n: int) -> np.ndarray:
    """Mazes [B, m, m] placed in the top-left corner of n x n grids of walls ([B, n, n]): same
    reachable set, so a stream of mixed sizes has one row shape."""
    B, m = cells.shape[:2]
    if m > n:
        raise ValueError(f"pad_mazes: mazes of size {m} do not fit in n={n}.")
    out = np.full((B, n, n), WALL, dtype=cells.dtype)
    out[:, :m, :m] = cells
    return out


def maze_stream(N: int, checkpoint: Optional[str] = None, seed: int = 4321) -> Stream:
    """The halting study's looped transformer (the trained checkpoint) on N mazes, half 8x8
    (padded to 16x16 with walls) and half 16x16, shuffled; its fixed-point rule (norm, rtol)."""
    model, meta = load_maze(checkpoint or MAZE_CHECKPOINT)
    rng = np.random.default_rng(seed)
    small, big = generate(N // 2, 8, rng, max_difficulty=48), generate(N - N // 2, 16, rng, max_difficulty=48)
    cells = torch.as_tensor(np.concatenate([pad_mazes(small.cells, 16), big.cells]))
    labels = torch.as_tensor(np.concatenate([pad_mazes(small.reachable, 16), big.reachable])).flatten(1)
    is8 = torch.arange(N) < N // 2
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    cells, labels, is8 = cells[perm], labels[perm], is8[perm]
    with torch.no_grad():
        emb, code = model.inputs(cells)
    rule = meta["rule"]
    return Stream("maze", f"the halting study's looped transformer (benchmarks/data/maze_loop.pt, dim "
                  f"{model.dim}) on {N} mazes, half 8x8 padded with walls to 16x16 and half 16x16 (256 "
                  f"tokens each), BFS depth <= 48; norm {rule['norm']}; batches/slots of 32",
                  model, (emb, code), 32, rule["rtol"], 64, norm=rule["norm"],
                  readout=lambda z, x: model.predict(z, x[1]), labels=labels,
                  groups={"8x8 (padded)": is8, "16x16": ~is8, "all": torch.ones(N, dtype=torch.bool)})


def build(name: str, quick: bool = False) -> Stream:
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        N, n = (512 if quick else 2048), 256
        c = 0.3 + 0.68 * torch.rand(N, 1, generator=gen)
        x = torch.randn(N, n, generator=gen)
        return Stream(name, f"tanh(c_i W z + x), W symmetric with spectral radius 1, c_i ~ U[0.3, 0.98], "
                      f"width {n}, {N} inputs, batches/slots of 64", MixedMLP(n, gen).eval(), (x, c), 64, 1e-4, 100)
    if name == "transformer":
        torch.manual_seed(0)
        N, seq, d = (64 if quick else 256), 16, 64
        c = 0.2 + 0.7 * torch.rand(N, generator=gen)
        x = torch.randn(N, seq, d, generator=gen)
        return Stream(name, f"pre-norm transformer block, output c_i tanh(.) + x, c_i ~ U[0.2, 0.9], seq {seq}, "
                      f"width {d}, {N} inputs, batches/slots of 16", SmallBlock(d, 4, gen).eval(), (x, c), 16,
                      1e-4, 100)
    if name == "maze":
        return maze_stream(128 if quick else 512)
    raise ValueError(f"build: name must be one of {STREAMS}; got {name!r}.")


def _z0(s: Stream, rows: int) -> torch.Tensor:
    """Zero states shaped like the first input field (the state's shape in every stream here)."""
    return torch.zeros((rows,) + tuple(s.x[0].shape[1:]))


def run_fixed(s: Stream, f: Callable[..., Any], K: int) -> None:
    for xb in s.batches():
        z = _z0(s, xb[0].shape[0])
        for _ in range(K):
            z = f(z, xb)


def run_solve(s: Stream, f: Callable[..., Any], halting: str) -> List[fpsolve.Solution]:
    return [fpsolve.solve(f, _z0(s, xb[0].shape[0]), xb, solver="fixed_point", rtol=s.rtol, norm=s.norm,
                          max_iter=s.max_iter, halting=halting, backward="none") for xb in s.batches()]


def run_stream(s: Stream, f: Callable[..., Any], check_every: Any = None, compile: bool = False) -> fpsolve.Solution:
    return fpsolve.solve_stream(f, s.batches(), slots=s.batch, solver="fixed_point", rtol=s.rtol, norm=s.norm,
                                max_iter=s.max_iter, z0=_z0(s, 1), check_every=check_every, compile=compile)


def verify(s: Stream, check_every: Any = None) -> Dict[str, Any]:
    """Correctness, no timing: per sample, stream and solve(halting="sample") agree on
    iterations, status and (with a readout) the answer; the largest |z| difference; accuracy."""
    with torch.no_grad():
        st = run_stream(s, s.f, check_every)
        sols = run_solve(s, s.f, "sample")
    z = torch.cat([x.z for x in sols])
    its = torch.cat([x.iterations for x in sols])
    status = torch.cat([x.status for x in sols])
    out = {"name": s.name, "N": s.N, "iterations_differ": int((st.iterations != its).sum()),
           "status_differ": int((st.status != status).sum()),
           "max_abs_z_diff": float((st.z - z).abs().max()),
           "mean_iterations": float(st.iterations.float().mean()), "max_iterations": int(st.iterations.max()),
           "converged": float(st.converged.float().mean())}
    if s.readout is not None:
        out["answers_differ"] = int((s.readout(st.z, s.x) != s.readout(z, s.x)).flatten(1).any(1).sum())
        out["accuracy_stream"] = s.accuracy(st.z)
        out["accuracy_solve"] = s.accuracy(z)
    return out


def equal_accuracy_depth(s: Stream, K: int, target: Any) -> Any:
    """The smallest fixed depth whose plain-iteration answers are as accurate as `target`."""
    if target is None:
        return None
    zs = [_z0(s, xb[0].shape[0]) for xb in s.batches()]
    with torch.no_grad():
        for k in range(1, K + 1):
            zs = [s.f(z, xb) for z, xb in zip(zs, s.batches())]
            if s.accuracy(torch.cat(zs)).get("all", 0.0) >= target - 1e-12:
                return k
    return K


def measure(s: Stream, repeats: int, compiled: bool = True, check_every: Any = None) -> Dict[str, Any]:
    """Every method timed in alternating rounds; least and median wall time per method."""
    with torch.no_grad():
        ref = run_stream(s, s.f, check_every=1)
    its = ref.iterations
    N, K, total = its.numel(), int(its.max()), int(its.sum())
    accuracy = s.accuracy(ref.z)
    methods: Dict[str, Callable[[Callable[..., Any]], Any]] = {
        "fixed depth (oracle K)": lambda f: run_fixed(s, f, K),
        "solve, halting='batch'": lambda f: run_solve(s, f, "batch"),
        "solve, halting='sample'": lambda f: run_solve(s, f, "sample"),
        "stream": lambda f: run_stream(s, f, check_every),
    }
    k_acc = equal_accuracy_depth(s, K, accuracy.get("all")) if accuracy else None
    if k_acc is not None and k_acc != K:
        methods[f"fixed depth at equal accuracy (K={k_acc})"] = lambda f: run_fixed(s, f, k_acc)
    fs = {m: s.f for m in methods}
    compile_s = None
    if compiled:
        fc = torch.compile(s.f)
        t0 = time.perf_counter()
        with torch.no_grad():
            run_stream(s, fc, check_every, compile=True)   # warm-up: compiles f and the bookkeeping once
            run_fixed(s, fc, K)
        compile_s = time.perf_counter() - t0
        methods["stream, compile=True (bookkeeping)"] = lambda f: run_stream(s, f, check_every, compile=True)
        methods["fixed depth, compiled f"] = lambda f: run_fixed(s, f, K)
        methods["stream, compiled f, compile=True"] = lambda f: run_stream(s, f, check_every, compile=True)
        fs["stream, compile=True (bookkeeping)"] = s.f
        fs["fixed depth, compiled f"] = fs["stream, compiled f, compile=True"] = fc
    walls: Dict[str, List[float]] = {m: [] for m in methods}
    counts: Dict[str, Tuple[int, int]] = {}
    with torch.no_grad():
        for m, run in methods.items():     # warm-up and counts
            cf = Counted(fs[m])
            run(cf)
            counts[m] = (cf.calls, cf.rows)
        for _ in range(repeats):
            for m, run in methods.items():
                t0 = time.perf_counter()
                run(fs[m])
                walls[m].append(time.perf_counter() - t0)
    fixed = min(walls["fixed depth (oracle K)"])
    out = {"name": s.name, "description": s.description, "N": N, "K": K, "iterations_sum": total,
           "iterations_mean": total / N, "slots": s.batch, "rtol": s.rtol, "norm": s.norm,
           "accuracy": accuracy, "k_equal_accuracy": k_acc, "ideal_ms": fixed * total / (N * K) * 1e3,
           "compile_s": compile_s, "check_every": check_every or fpsolve._options.DEFAULT_CHECK_EVERY,
           "methods": {}}
    for m in methods:
        w = sorted(walls[m])
        calls, rows = counts[m]
        out["methods"][m] = {"wall_ms": w[0] * 1e3, "wall_ms_median": w[len(w) // 2] * 1e3,
                             "samples_per_s": N / w[0], "calls": calls, "rows": rows,
                             "occupancy": rows / (calls * s.batch), "x_fixed": w[0] / fixed}
    st = out["methods"]["stream"]
    best = min((v for k, v in out["methods"].items() if k.startswith("stream") and "compiled f" not in k),
               key=lambda v: v["wall_ms"])
    out["limits"] = {"rows_min": total, "calls_min": total / s.batch,
                     "calls_goal": 1.15 * total / s.batch + K}
    out["goals"] = {
        "stream calls <= 1.15 sum/slots + K": st["calls"] <= out["limits"]["calls_goal"],
        "stream / fixed": st["x_fixed"],
        "stream / solve(sample)": st["wall_ms"] / out["methods"]["solve, halting='sample'"]["wall_ms"],
        "stream / ideal": st["wall_ms"] / out["ideal_ms"],
        "best eager-f stream / fixed": best["x_fixed"],
        "best eager-f stream / solve(sample)": best["wall_ms"] / out["methods"]["solve, halting='sample'"]["wall_ms"],
        "best eager-f stream / ideal": best["wall_ms"] / out["ideal_ms"],
        "solve(sample) / fixed": out["methods"]["solve, halting='sample'"]["x_fixed"],
    }
    return out


def markdown(results: List[Dict[str, Any]]) -> List[str]:
    lines = []
    for r in results:
        lines += [
            f"**{r['name']}**: {r['description']}. Fixed-point solver, rtol {r['rtol']:g} ({r['norm']}), "
            f"N = {r['N']}, K = {r['K']} (the most any sample needs), mean iterations {r['iterations_mean']:.1f}; "
            + (f"accuracy (whole answer right) {', '.join(f'{g} {v:.3f}' for g, v in r['accuracy'].items())}; "
               if r["accuracy"] else "")
            + f"stream check_every {r['check_every']}"
            + (f"; torch.compile warm-up {r['compile_s']:.1f} s (not in the times)." if r['compile_s'] else "."),
            "",
            "| method | wall ms (least [median]) | × fixed depth | samples/s | f calls | f rows | occupancy |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m, v in r["methods"].items():
            lines.append(f"| {m} | {v['wall_ms']:.1f} [{v['wall_ms_median']:.1f}] | {v['x_fixed']:.2f}× | "
                         f"{v['samples_per_s']:.0f} | {v['calls']} | {v['rows']} | {v['occupancy']:.2f} |")
        lim = r["limits"]
        lines += [f"| ideal (fixed × Σit ÷ (N·K)) | {r['ideal_ms']:.1f} | "
                  f"{r['ideal_ms'] / r['methods']['fixed depth (oracle K)']['wall_ms']:.2f}× | | "
                  f"≥ {lim['calls_min']:.0f} | ≥ {lim['rows_min']} | |", ""]
        g = r["goals"]
        lines.append(f"stream: f calls {r['methods']['stream']['calls']} vs goal ≤ {lim['calls_goal']:.0f} "
                     f"({'met' if g['stream calls <= 1.15 sum/slots + K'] else 'NOT met'}); wall {g['stream / fixed']:.2f}× fixed depth, "
                     f"{g['stream / solve(sample)']:.2f}× solve(sample), {g['stream / ideal']:.2f}× ideal; the "
                     f"better of eager and compile=True: {g['best eager-f stream / fixed']:.2f}× fixed depth, "
                     f"{g['best eager-f stream / solve(sample)']:.2f}× solve(sample), {g['best eager-f stream / ideal']:.2f}× ideal. "
                     f"solve(sample): {g['solve(sample) / fixed']:.2f}× fixed depth.")
        ka = r.get("k_equal_accuracy")
        if ka is not None and r.get("accuracy"):
            eq = r["methods"].get(f"fixed depth at equal accuracy (K={ka})", r["methods"]["fixed depth (oracle K)"])
            acc = ", ".join(f"{g} {v:.3f}" for g, v in r["accuracy"].items())
            best = min(v["wall_ms"] for k, v in r["methods"].items() if k.startswith("stream") and "compiled f" not in k)
            lines.append(f"Accuracy of the stream's answers: {acc}. The smallest fixed depth as accurate is K = {ka}; "
                         f"stream throughput is {eq['wall_ms'] / r['methods']['stream']['wall_ms']:.2f}× that fixed "
                         f"depth's ({eq['wall_ms'] / best:.2f}× for the better of eager and compile=True), at "
                         f"{r['iterations_mean']:.1f} mean passes against {ka}.")
        lines.append("")
    return lines


def _solve_all(s: Stream, f: Callable[..., Any], check_every: int) -> List[fpsolve.Solution]:
    return [fpsolve.solve(f, _z0(s, xb[0].shape[0]), xb, solver="fixed_point", rtol=s.rtol, norm=s.norm,
                          max_iter=s.max_iter, backward="none", check_every=check_every) for xb in s.batches()]


def sweep(s: Stream, repeats: int, values: Tuple[int, ...] = (1, 2, 4, 8, 16)) -> List[str]:
    """check_every against wall time and f calls, for stream and solve(sample), one run."""
    with torch.no_grad():
        ref = run_stream(s, s.f, check_every=1)
    K = int(ref.iterations.max())
    runs: Dict[str, Callable[[], Any]] = {"fixed": lambda: run_fixed(s, s.f, K)}
    for v in values:
        runs[f"stream {v}"] = (lambda v=v: run_stream(s, s.f, v))
        runs[f"solve {v}"] = (lambda v=v: _solve_all(s, s.f, v))
    walls: Dict[str, List[float]] = {m: [] for m in runs}
    with torch.no_grad():
        for m, run in runs.items():
            run()
        for _ in range(repeats):
            for m, run in runs.items():
                t0 = time.perf_counter()
                run()
                walls[m].append(time.perf_counter() - t0)
    fixed = min(walls["fixed"])
    out = [f"**{s.name}**, `check_every` against wall time (least of {repeats}, × oracle fixed depth) and f calls:", "",
           "| check_every | stream wall | stream f calls | solve(sample) wall | solve f rows |", "|---:|---:|---:|---:|---:|"]
    for v in values:
        cs, cv = Counted(s.f), Counted(s.f)
        with torch.no_grad():
            run_stream(s, cs, v)
            _solve_all(s, cv, v)
        out.append(f"| {v} | {min(walls[f'stream {v}']) / fixed:.2f}× | {cs.calls} | "
                   f"{min(walls[f'solve {v}']) / fixed:.2f}× | {cv.rows} |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--check-every", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="only the check_every sweep")
    ap.add_argument("--streams", nargs="*", choices=STREAMS, default=list(STREAMS))
    ap.add_argument("--verify", action="store_true",
                    help="no timing: check stream against solve(halting='sample') per sample, and accuracy")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.verify:
        for n in a.streams:
            print(verify(build(n, a.quick), a.check_every))
        return
    if a.sweep:
        for n in a.streams:
            print("\n".join(sweep(build(n, a.quick), a.repeats)))
        return
    res = [measure(build(n, a.quick), a.repeats, not a.no_compile, a.check_every) for n in a.streams]
    print("\n".join(markdown(res)))


if __name__ == "__main__":
    main()
