"""BENCH.md problem 5, `backward`: time and memory of one forward + backward as depth grows.

    python benchmarks/backward.py [--repeats 5] [--threads 2] [--depths 10,50,200] [--float64]
                                  [--modes unroll,unroll_checkpoint] [--no-torchdeq]

The map is `mlp_hard` of problems.py (tanh(W z + U x), W symmetric with spectral radius 0.99,
width 256, batch 64) with W and U made trainable parameters. "Forward depth" d: the solve runs
exactly d evaluations of f (max_iter = d and a tolerance that is never met: rtol = 1e-30,
atol = 0; the contraction 0.99 keeps every residual far above round-off for 200 passes), by
plain fixed-point iteration in both libraries. The loss is <c, z*> for a fixed random c.

Modes, each the same work in both libraries where both have it:
  fpsolve implicit  Implicit(solver="fixed_point", rtol=1e-30, max_iter=30): exactly 30 adjoint
                    iterations (vector-Jacobian products), whatever the depth
  torchdeq ift      get_deq(core="sliced", ift=True, b_solver="fixed_point_iter",
                    b_max_iter=30, b_tol=1e-30): the same 30 adjoint iterations
  fpsolve phantom   Phantom(steps=5, damping=0.5)
  torchdeq phantom  get_deq(core="sliced", grad=5, tau=0.5)
  fpsolve unroll    Unroll(): backpropagation through all d forward passes (torchdeq has none)
  fpsolve unroll_ckpt        Unroll(checkpoint=1): the same, in checkpointed segments of one pass
  fpsolve unroll_checkpoint  Unroll(checkpoint=10): the same in segments of 10 passes, each
                    recomputed in backward (memory grows with d / 10 segments)
  fpsolve unroll_last        Unroll(steps=d): d passes of f from the solution, recorded
  fpsolve unroll_last_ckpt   Unroll(steps=d, checkpoint=10): the same d passes in segments of 10,
                    each recomputed in backward (memory grows with d / 10 segments)

Memory, two measures per run (CPU has no allocator statistics such as
torch.cuda.max_memory_allocated):
  saved   bytes of the distinct storages autograd saves for backward during the forward,
          counted with torch.autograd.graph.saved_tensors_hooks, parameters and inputs left
          out (what a mode keeps alive until backward, beyond what exists anyway);
  peak    the peak of the bytes held by torch's CPU allocator during forward + backward,
          relative to the start: the running sum of the allocation / free events recorded by
          torch.profiler(profile_memory=True), in a separate (untimed) run.
Times: forward and backward measured separately, median of `repeats` runs with [min, max],
modes alternating within every repeat after one warm-up run each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fpsolve  # noqa: E402
from harness import git_rev, loadavg, machine  # noqa: E402
from problems import build  # noqa: E402

DEPTHS = (10, 50, 200)
ADJOINT_ITERS = 30
PHANTOM_STEPS, PHANTOM_DAMPING = 5, 0.5
SEGMENT = 10      # passes per checkpointed segment in unroll_checkpoint and unroll_last_ckpt
FPSOLVE_MODES = ("implicit", "phantom", "unroll", "unroll_ckpt", "unroll_checkpoint", "unroll_last",
                 "unroll_last_ckpt")
NEVER = 1e-30     # a tolerance that is never met: every solve runs its whole budget


class TrainableTanh(nn.Module):
    """z -> tanh(z Wᵀ + x Uᵀ) with W, U parameters (the weights of problems.py's mlp_hard)."""

    def __init__(self, wt: torch.Tensor, ut: torch.Tensor) -> None:
        super().__init__()
        self.wt = nn.Parameter(wt.clone())
        self.ut = nn.Parameter(ut.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(x @ self.ut, z, self.wt))


class Case:
    """One mode at one depth: `forward()` returns (z, info); `backward(z)` runs the loss."""

    def __init__(self, library: str, mode: str, depth: int, f: TrainableTanh, x: torch.Tensor,
                 z0: torch.Tensor, c: torch.Tensor) -> None:
        self.library, self.mode, self.depth = library, mode, depth
        self.f, self.x, self.z0, self.c = f, x, z0, c
        self.deq: Optional[nn.Module] = None
        self.rows = 0
        if library == "torchdeq":
            from torchdeq import get_deq
            common = dict(core="sliced", f_solver="fixed_point_iter", f_max_iter=depth, f_tol=NEVER,
                          f_stop_mode="abs")
            if mode == "implicit":
                self.deq = get_deq(ift=True, b_solver="fixed_point_iter", b_max_iter=ADJOINT_ITERS,
                                   b_tol=NEVER, b_stop_mode="abs", **common)
            else:
                self.deq = get_deq(grad=PHANTOM_STEPS, tau=PHANTOM_DAMPING, **common)
            self.deq.train()
        else:
            self.backward_mode = {
                "implicit": fpsolve.Implicit(solver="fixed_point", rtol=NEVER, max_iter=ADJOINT_ITERS),
                "phantom": fpsolve.Phantom(steps=PHANTOM_STEPS, damping=PHANTOM_DAMPING),
                "unroll": fpsolve.Unroll(),
                "unroll_ckpt": fpsolve.Unroll(checkpoint=1),
                "unroll_checkpoint": fpsolve.Unroll(checkpoint=SEGMENT),
                "unroll_last": fpsolve.Unroll(steps=depth),
                "unroll_last_ckpt": fpsolve.Unroll(steps=depth, checkpoint=SEGMENT),
            }[mode]

    @property
    def name(self) -> str:
        return f"{self.library}/{self.mode}"

    def counted(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f, counting the rows passed through it (forward and backward alike)."""
        self.rows += z.shape[0]
        return self.f(z, x)

    def forward(self) -> Tuple[torch.Tensor, Any]:
        self.rows = 0
        if self.deq is not None:
            z_out, info = self.deq(lambda z: self.counted(z, self.x), self.z0)
            return z_out[-1], info
        sol = fpsolve.solve(self.counted, self.z0, self.x, solver="fixed_point", rtol=NEVER,
                            max_iter=self.depth, backward=self.backward_mode)
        return sol.z, sol

    def backward(self, z: torch.Tensor) -> None:
        (z * self.c).sum().backward()

    def clear(self) -> None:
        for p in self.f.parameters():
            p.grad = None


def saved_bytes(run: Callable[[], Any], exclude: List[torch.Tensor]) -> Tuple[int, Any]:
    """Bytes of the distinct storages autograd saves for backward during run(), leaving out
    those of `exclude` (parameters and inputs, which exist anyway). Saved storages are kept
    referenced until the end, so a freed address cannot be reused and miscounted."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    kept: List[Any] = []
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kept.append(storage)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    kept.clear()
    return total, out


def peak_bytes(run: Callable[[], Any]) -> Optional[int]:
    """Peak of the CPU allocator's bytes in use during run(), relative to its start (profiler
    memory events); None if this torch's profiler does not expose them."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:   # the kineto event API is not public; degrade to the saved-bytes measure
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def run_benchmark(dtype: torch.dtype, depths: Tuple[int, ...], repeats: int,
                  with_torchdeq: bool, modes: Tuple[str, ...] = FPSOLVE_MODES) -> List[Dict[str, Any]]:
    p = build("mlp_hard", dtype)
    f = TrainableTanh(p.f.wt, p.f.ut)
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(p.z0.shape, generator=gen, dtype=torch.float64).to(dtype)
    rows: List[Dict[str, Any]] = []
    for depth in depths:
        cases = [Case("fpsolve", m, depth, f, p.x, p.z0, c) for m in modes]
        if with_torchdeq:
            cases += [Case("torchdeq", m, depth, f, p.x, p.z0, c) for m in ("implicit", "phantom")]
        fwd: Dict[str, List[float]] = {k.name: [] for k in cases}
        bwd: Dict[str, List[float]] = {k.name: [] for k in cases}
        info: Dict[str, Any] = {}
        for rep in range(repeats + 1):          # repeat 0 is the warm-up
            for case in (cases if rep % 2 else cases[::-1]):   # alternate the order
                case.clear()
                t0 = time.perf_counter()
                z, inf = case.forward()
                t1 = time.perf_counter()
                rows_fwd = case.rows
                case.backward(z)
                t2 = time.perf_counter()
                if rep:
                    fwd[case.name].append(t1 - t0)
                    bwd[case.name].append(t2 - t1)
                info[case.name] = (inf, rows_fwd / p.z0.shape[0], case.rows / p.z0.shape[0])
        for case in cases:
            case.clear()
            saved, (z, inf) = saved_bytes(case.forward, [*f.parameters(), p.x, p.z0, c])
            case.backward(z)
            case.clear()
            peak = peak_bytes(lambda: case.backward(case.forward()[0]))
            inf, evals_fwd, evals_all = info[case.name]
            adj = getattr(inf, "adjoint", None)
            f_ms, b_ms = [1e3 * v for v in fwd[case.name]], [1e3 * v for v in bwd[case.name]]
            tot = [a + b for a, b in zip(f_ms, b_ms)]
            rows.append(dict(
                problem="backward", dtype=str(dtype).replace("torch.", ""), library=case.library,
                mode=case.mode, depth=depth, f_evals_forward=evals_fwd, f_evals_total=evals_all,
                adjoint_iterations=None if adj is None else float(adj.iterations.double().mean()),
                forward_ms=statistics.median(f_ms), forward_ms_min=min(f_ms), forward_ms_max=max(f_ms),
                backward_ms=statistics.median(b_ms), backward_ms_min=min(b_ms), backward_ms_max=max(b_ms),
                total_ms=statistics.median(tot), saved_bytes=saved, peak_bytes=peak,
            ))
    return rows


def _mib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def _find(rows: List[Dict[str, Any]], library: str, mode: str, depth: int, dtype: str) -> Optional[Dict[str, Any]]:
    for r in rows:
        if (r["library"], r["mode"], r["depth"], r["dtype"]) == (library, mode, depth, dtype):
            return r
    return None


def markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[str]:
    lines = [
        "## Backward: time and memory against forward depth (problem 5)",
        "",
        f"Made by `{meta['command']}` on {meta['date']}, commit {meta['commit']}. Machine: {meta['cpu']}, "
        f"{meta['cores']} cores, torch {meta['torch']}, `torch.set_num_threads({meta['threads']})`, CPU. "
        f"Load average before {meta['load_before']}, after {meta['load_after']}. Median of {meta['repeats']} "
        "repeats [min, max], modes alternating, after a warm-up.",
        "",
        "The map is `mlp_hard` (tanh(W z + U x), W symmetric with spectral radius 0.99, width 256, batch 64) "
        "with W and U as parameters; loss ⟨c, z*⟩. The forward solve is plain fixed-point iteration with "
        "exactly *depth* evaluations of f (max_iter = depth, rtol = 1e-30, so the tolerance is never met) in "
        f"both libraries. Implicit modes run exactly {ADJOINT_ITERS} adjoint iterations in both libraries "
        f"(fixed-point, tolerance never met); phantom modes take {PHANTOM_STEPS} steps with damping "
        f"{PHANTOM_DAMPING}; unroll backpropagates through every forward pass (torchdeq has no such mode), "
        "unroll_ckpt the same in checkpointed segments of one pass (`Unroll(checkpoint=1)`), "
        f"unroll_checkpoint in segments of {SEGMENT} passes (`Unroll(checkpoint={SEGMENT})`: only the loop's state "
        "entering each segment is kept); "
        f"unroll_last records *depth* passes of f from the solution (`Unroll(steps=depth)`), "
        f"unroll_last_ckpt the same in checkpointed segments of {SEGMENT} passes "
        f"(`Unroll(steps=depth, checkpoint={SEGMENT})`).",
        "",
        "*saved*: bytes of the distinct storages autograd saves for backward during the forward "
        "(`saved_tensors_hooks`; parameters and inputs, which exist anyway, left out). *peak*: the "
        "peak of the bytes held by torch's CPU allocator over forward + backward, above the level at the "
        "start, from the allocation events of `torch.profiler(profile_memory=True)` (a separate, untimed run).",
        "",
        "| dtype | library | mode | depth | f passes / sample (forward, backward) | forward ms | backward ms "
        "| total ms | saved MiB | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        it = f"{r['f_evals_forward']:.0f}, {r['f_evals_total'] - r['f_evals_forward']:.0f}"
        lines.append(
            f"| {r['dtype']} | {r['library']} | {r['mode']} | {r['depth']} | {it} | "
            f"{r['forward_ms']:.2f} [{r['forward_ms_min']:.2f}, {r['forward_ms_max']:.2f}] | "
            f"{r['backward_ms']:.2f} [{r['backward_ms_min']:.2f}, {r['backward_ms_max']:.2f}] | "
            f"{r['total_ms']:.2f} | {_mib(r['saved_bytes'])} | {_mib(r['peak_bytes'])} |"
        )
    lines += ["", "### Targets (issue 4)", "", "| dtype | target | measured | |", "|---|---|---|---|"]
    for dtype in sorted({r["dtype"] for r in rows}):
        depths = sorted({r["depth"] for r in rows if r["dtype"] == dtype})
        lo, hi = depths[0], depths[-1]
        a, b = _find(rows, "fpsolve", "implicit", lo, dtype), _find(rows, "fpsolve", "implicit", hi, dtype)
        if a and b:
            key = "peak_bytes" if a["peak_bytes"] is not None and b["peak_bytes"] is not None else "saved_bytes"
            ratio = b[key] / max(a[key], 1)
            lines.append(f"| {dtype} | implicit memory ({key.split('_')[0]}) at depth {hi} ≤ 1.1× at depth {lo} | "
                         f"{ratio:.3f}× ({_mib(b[key])} vs {_mib(a[key])} MiB) | {'met' if ratio <= 1.1 else '**not met**'} |")
            ratio_s = b["saved_bytes"] / max(a["saved_bytes"], 1)
            lines.append(f"| {dtype} | implicit saved bytes at depth {hi} ≤ 1.1× at depth {lo} | {ratio_s:.3f}× | "
                         f"{'met' if ratio_s <= 1.1 else '**not met**'} |")
        for d in depths:
            ours, theirs = _find(rows, "fpsolve", "implicit", d, dtype), _find(rows, "torchdeq", "implicit", d, dtype)
            if ours and theirs:
                ratio = ours["backward_ms"] / theirs["backward_ms"]
                lines.append(f"| {dtype} | implicit backward time ≤ torchdeq's, depth {d} | {ratio:.2f}× "
                             f"({ours['backward_ms']:.2f} vs {theirs['backward_ms']:.2f} ms) | "
                             f"{'met' if ratio <= 1.0 else '**not met**'} |")
        for d in depths:
            plain, ck = _find(rows, "fpsolve", "unroll", d, dtype), _find(rows, "fpsolve", "unroll_checkpoint", d, dtype)
            if plain and ck:
                for key in ("saved_bytes", "peak_bytes"):
                    if plain[key] is None or ck[key] is None:
                        continue
                    ratio = ck[key] / max(plain[key], 1)
                    lines.append(f"| {dtype} | Unroll(checkpoint={SEGMENT}) {key.split('_')[0]} memory at depth {d} "
                                 f"≤ 0.3× Unroll()'s (issue 19, item 11) | {ratio:.3f}× ({_mib(ck[key])} vs "
                                 f"{_mib(plain[key])} MiB) | {'met' if ratio <= 0.3 else '**not met**'} |")
        for d in depths:
            plain, ck = _find(rows, "fpsolve", "unroll_last", d, dtype), _find(rows, "fpsolve", "unroll_last_ckpt", d, dtype)
            if plain and ck:
                lines.append(f"| {dtype} | checkpointed unroll of {d} passes ({-(-d // SEGMENT)} segments): saved bytes, "
                             f"vs plain | {_mib(ck['saved_bytes'])} vs {_mib(plain['saved_bytes'])} MiB "
                             f"({ck['saved_bytes'] / max(plain['saved_bytes'], 1):.3f}×) | |")
    lines.append("")
    return lines


def main(argv: Optional[List[str]] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Run the benchmark; return (rows, markdown lines for docs/benchmarks.md)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave as the caller set it; 2 as a script)")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--float64", action="store_true", help="also run float64 (float32 always runs)")
    ap.add_argument("--no-torchdeq", action="store_true")
    ap.add_argument("--modes", default=",".join(FPSOLVE_MODES), help="the fpsolve modes to run (comma-separated)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    depths = tuple(int(d) for d in args.depths.split(","))
    try:
        import torchdeq  # noqa: F401
        with_torchdeq = not args.no_torchdeq
    except ImportError:
        with_torchdeq = False
    load_before = loadavg()
    rows: List[Dict[str, Any]] = []
    with warnings.catch_warnings():
        # the implicit adjoint runs a fixed 30 iterations on purpose (tolerance never met)
        warnings.simplefilter("ignore", fpsolve.ConvergenceWarning)
        for dtype in [torch.float32] + ([torch.float64] if args.float64 else []):
            rows += run_benchmark(dtype, depths, args.repeats, with_torchdeq, tuple(args.modes.split(",")))
    meta = dict(machine(), load_before=load_before, load_after=loadavg(), repeats=args.repeats,
                commit=git_rev(),
                command="python benchmarks/backward.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return rows, markdown(rows, meta)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--threads") for a in argv):
        argv = ["--threads", "2"] + argv
    _, lines = main(argv)
    print("\n".join(lines))
