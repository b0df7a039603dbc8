"""Two timescales as one fixed point: an HRM-style loop on the maze task, solved and diagnosed
with fpsolve, against the single-timescale loop of the halting study at equal parameters.

    python examples/hierarchical.py           # about 100 s of CPU on 1 thread; writes
                                              # docs/figures/hierarchical.png, docs/hierarchical.json

The state is a tuple (z_high, z_low), both [B, cells, dim]. One call of f runs T low-level
updates conditioned on the high level (the low block's input is the cell embedding plus
z_high), then one high-level update that reads the low level (its input is z_low):

    f((z_high, z_low), x) = (H(z_high, L^T(z_low; emb + z_high)), L^T(z_low; emb + z_high))

One map over the tuple, so `fpsolve.solve(model, (zeros, zeros), x)` halts it per sample like
any DEQ, and `fpsolve.diagnose` reads it like any map. Both blocks are
`fpsolve.LoopedTransformerBlock`s with the maze's neighbour attention (examples/maze.py), so
information moves one open cell per block call: a pass of f moves it up to T + 1 cells.

The baseline is `maze.MazeLoop` (one block of width 32: the halting study's model). The
two-timescale model has two blocks of width 22: 8405 parameters against 8737. Both are trained
with the halting study's "difficulty" recipe (unrolled through every pass, deep supervision
from the first pass at which the answer can be known: max(d, 1) for the baseline,
max(ceil(d / T), 1) for the two-timescale loop, plus a penalty on moving after it), on 8x8
mazes with BFS depth d <= 12, the same batches for both. Tests: fresh 8x8 mazes and 16x16
mazes (d up to 48: extrapolation), solved by fpsolve with plain iteration and per-sample
halting; budgets of 64 passes (baseline) and 32 (two-timescale), both enough for d = 48.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fpsolve  # noqa: E402
from maze import MazeLoop, Mazes, consistent, generate, neighbour_mask  # noqa: E402
from halting.supervision import deep_supervision_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MAX_DIFFICULTY = 12
BUCKETS = [(0, 3), (4, 7), (8, 12), (13, 20), (21, 30), (31, 99)]


@dataclass
class Config:
    steps: int = 200                 # training steps of each model
    batch: int = 32
    lr: float = 1e-2
    settle_weight: float = 0.1
    low_steps: int = 2               # T: low-level updates per pass of f
    n_test: Dict[int, int] = field(default_factory=lambda: {8: 128, 16: 64})
    n_diagnose: Dict[int, int] = field(default_factory=lambda: {8: 16, 16: 24})
    rtol: float = 1e-3               # halting: ||f(z) - z||_inf <= rtol ||f(z)||_inf
    budget: Dict[str, int] = field(default_factory=lambda: {"single": 64, "two-timescale": 32})
    seed: int = 0


# ---------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------

class TwoTimescale(nn.Module):
    """f((z_high, z_low), x): T low-level updates conditioned on z_high, then one high-level
    update reading z_low. x = (embedding [B, L, D], cell codes [B, L, 1]); walls carry no
    state at either level. The readout is on z_high."""

    blocks_per_pass: int

    def __init__(self, dim: int = 22, heads: int = 2, low_steps: int = 2, sizes=(8, 16)) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, dim)
        self.low = fpsolve.LoopedTransformerBlock(dim, heads=heads)
        self.high = fpsolve.LoopedTransformerBlock(dim, heads=heads)
        self.readout = nn.Linear(dim, 1)
        self.low_steps = low_steps
        self.blocks_per_pass = low_steps + 1
        self.masks = {n: neighbour_mask(n) for n in sizes}

    def inputs(self, cells: Tensor) -> Tuple[Tensor, Tensor]:
        flat = cells.flatten(1)
        return self.embed(flat), flat.unsqueeze(-1).to(self.embed.weight.dtype)

    def start(self, x: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        return torch.zeros_like(x[0]), torch.zeros_like(x[0])

    def forward(self, z: Tuple[Tensor, Tensor], x: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        z_high, z_low = z
        emb, code = x
        mask = self.masks[int(round(z_high.shape[1] ** 0.5))]
        keep = (code > 0.5).to(z_high.dtype)
        for _ in range(self.low_steps):
            z_low = self.low(z_low, emb + z_high, attn_mask=mask) * keep
        z_high = self.high(z_high, z_low, attn_mask=mask) * keep
        return z_high, z_low

    def low_map(self, z_low: Tensor, x: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """The low level alone, z_high frozen (x = (emb, code, z_high)): T updates."""
        emb, code, z_high = x
        return self.forward((z_high, z_low), (emb, code))[1]

    def high_map(self, z_high: Tensor, x: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """The high level alone, z_low frozen (x = (emb, code, z_low)): one update."""
        emb, code, z_low = x
        mask = self.masks[int(round(z_high.shape[1] ** 0.5))]
        return self.high(z_high, z_low, attn_mask=mask) * (code > 0.5).to(z_high.dtype)

    def logits(self, z: Tuple[Tensor, Tensor]) -> Tensor:
        return self.readout(z[0]).squeeze(-1)

    def predict(self, z: Tuple[Tensor, Tensor], code: Tensor) -> Tensor:
        return (self.logits(z) > 0) & (code.squeeze(-1) > 0.5)


class SingleTimescale(MazeLoop):
    """The halting study's looped model (width 32), with the interface used here."""

    blocks_per_pass = 1
    low_steps = 1

    def start(self, x: Tuple[Tensor, Tensor]) -> Tensor:
        return torch.zeros_like(x[0])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def as_tensors(m: Mazes) -> Tuple[Tensor, Tensor, Tensor]:
    return (torch.as_tensor(m.cells), torch.as_tensor(m.reachable).flatten(1),
            torch.as_tensor(m.difficulty))


# ---------------------------------------------------------------------------------------
# training (the halting study's "difficulty" recipe)
# ---------------------------------------------------------------------------------------

def train(model: nn.Module, cfg: Config, bar: Optional[Any] = None) -> List[float]:
    """Unrolled through every pass; deep supervision from the first pass at which the answer
    can be known, a penalty on the relative step after it (the halting study's loss,
    `halting.supervision.deep_supervision_loss`). Same seed, same batches."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(1000 + cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    losses: List[float] = []
    model.train()
    for _ in range(cfg.steps):
        cells, labels, d = as_tensors(generate(cfg.batch, 8, rng, max_difficulty=TRAIN_MAX_DIFFICULTY))
        x = model.inputs(cells)
        open_ = (cells.flatten(1) > 0).float()
        first = torch.div(d + model.low_steps - 1, model.low_steps, rounding_mode="floor").clamp_min(1)
        T = int(first.max()) + int(rng.integers(2, 6))
        loss = deep_supervision_loss(model, model.start(x), x, labels, open_, first, first, T, cfg.settle_weight)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar(len(losses), losses[-1])
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------
# evaluation with fpsolve
# ---------------------------------------------------------------------------------------

def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}" if hi < 99 else f"{lo}+"


def evaluate(model: nn.Module, tests: Dict[int, Mazes], budget: int, rtol: float) -> dict:
    """fpsolve.solve per test set (plain iteration, per-sample halting): accuracy and passes
    per difficulty bucket, and the solver statistics of each set."""
    passes, correct, diff, stats = [], [], [], {}
    for n, m in tests.items():
        cells, labels, d = as_tensors(m)
        with torch.no_grad():
            x = model.inputs(cells)
            sol = fpsolve.solve(model, model.start(x), x, solver="fixed_point", norm="inf", rtol=rtol,
                                max_iter=budget, backward="none")
            ok = (model.predict(sol.z, x[1]) == labels).all(-1)
        stats[f"{n}x{n}"] = sol.stats()
        passes.append(sol.iterations)
        correct.append(ok)
        diff.append(d)
    p, c, d = (torch.cat(v).numpy() for v in (passes, correct, diff))
    out = {"accuracy": float(c.mean()), "mean_passes": float(p.mean()),
           "mean_block_calls": float(p.mean() * model.blocks_per_pass),
           "accuracy_harder_than_training": float(c[d > TRAIN_MAX_DIFFICULTY].mean()),
           "by_bucket": {}, "stats": stats}
    for lo, hi in BUCKETS:
        sel = (d >= lo) & (d <= hi)
        if sel.any():
            out["by_bucket"][bucket_name(lo, hi)] = {
                "count": int(sel.sum()), "accuracy": float(c[sel].mean()),
                "mean_passes": float(p[sel].mean()), "max_passes": int(p[sel].max())}
    out["passes_per_difficulty"] = fit_slope(d, p)
    return out


def fit_slope(d: np.ndarray, p: np.ndarray) -> float:
    """Least-squares slope of passes against difficulty (passes per BFS step)."""
    if len(d) < 2 or np.all(d == d[0]):
        return float("nan")
    return float(np.polyfit(d.astype(float), p.astype(float), 1)[0])


def level_traces(model: TwoTimescale, tests: Dict[int, Mazes], passes: int) -> dict:
    """Plain iteration of the two-timescale f: per level and pass, the relative step
    ||Δz_level||_inf / ||z_level||_inf per sample; the pass from which each level stays below
    the tolerance ("settles"), and how often the low level settles first."""
    out = {}
    for n, m in tests.items():
        cells, _, d = as_tensors(m)
        with torch.no_grad():
            x = model.inputs(cells)
            z = model.start(x)
            steps = []
            for _ in range(passes):
                z_new = model(z, x)
                steps.append(torch.stack([
                    (a - b).flatten(1).abs().amax(1) / a.flatten(1).abs().amax(1).clamp_min(1e-30)
                    for a, b in zip(z_new, z)]))        # [2, B]: high, low
                z = z_new
        out[n] = (torch.stack(steps), d)                  # [T, 2, B]
    return out


def settle_pass(step: Tensor, tol: float) -> Tensor:
    """[T, B] relative steps -> int64 [B]: the first pass from which every later step is <= tol
    (T + 1: never)."""
    T = step.shape[0]
    above = step > tol
    idx = torch.arange(1, T + 1).unsqueeze(1).expand_as(above)
    last = torch.where(above, idx, torch.zeros_like(idx)).amax(0)
    return last + 1


def diagnose_levels(model: TwoTimescale, tests: Dict[int, Mazes], cfg: Config) -> dict:
    """fpsolve.diagnose on the whole tuple map (with the task's check), then on each level's own
    map with the other level frozen at the solution: flags, period and spectral radius."""
    rows = {"whole": [], "low": [], "high": []}
    radius: Dict[str, List[float]] = {"whole": [], "low": [], "high": []}
    for n, m in tests.items():
        k = cfg.n_diagnose[n]
        cells, labels, _ = (t[:k] for t in as_tensors(m))
        with torch.no_grad():
            x = model.inputs(cells)

            def check(z: Any, xx: Any) -> Tensor:
                code = xx[1]
                pred = model.predict(z, code).view(-1, n, n)
                return consistent(pred, code.squeeze(-1).round().long().view(-1, n, n))

            opts = dict(solver="fixed_point", norm="inf", rtol=cfg.rtol, max_iter=cfg.budget["two-timescale"])
            rep = fpsolve.diagnose(model, model.start(x), x, restarts=2, check=check, **opts)
            z_high, z_low = rep.solution.z
            reports = {"whole": rep,
                       "low": fpsolve.diagnose(model.low_map, torch.zeros_like(z_low), (x[0], x[1], z_high),
                                               restarts=0, **opts),
                       "high": fpsolve.diagnose(model.high_map, torch.zeros_like(z_high), (x[0], x[1], z_low),
                                                restarts=0, **opts)}
        for key, r in reports.items():
            rows[key] += [sorted(f.name for f in flags) for flags in r.flags]
            radius[key] += r.spectral_radius.tolist()
    out = {}
    for key, flags in rows.items():
        names = sorted({f for fl in flags for f in fl})
        out[key] = {"samples": len(flags), "healthy": sum(not fl for fl in flags),
                    "flags": {f: sum(f in fl for fl in flags) for f in names},
                    "spectral_radius_median": float(np.nanmedian(radius[key])),
                    "spectral_radius_max": float(np.nanmax(radius[key]))}
    return out


# ---------------------------------------------------------------------------------------
# figure, report, main
# ---------------------------------------------------------------------------------------

def make_figure(results: dict, traces: dict, tol: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    colors = {"single": "tab:blue", "two-timescale": "tab:orange"}
    for key, res in results.items():
        b = res["by_bucket"]
        xs = [i for i, nm in enumerate(names) if nm in b]
        axes[0].plot(xs, [b[names[i]]["accuracy"] for i in xs], "o-", color=colors[key], label=key)
        axes[1].plot(xs, [b[names[i]]["mean_passes"] for i in xs], "o-", color=colors[key],
                     label=f"{key}: passes of f")
        if key == "two-timescale":
            axes[1].plot(xs, [b[names[i]]["mean_passes"] * res["blocks_per_pass"] for i in xs], "s--",
                         color=colors[key], alpha=0.6, label=f"{key}: block calls")
    axes[0].set_ylim(0, 1.05)
    for ax, title in ((axes[0], "accuracy (whole maze right)"), (axes[1], "mean passes (per-sample halting)")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_xlabel("BFS depth d (training: d ≤ 12)")
        ax.axvline(2.5, color="gray", lw=0.8, ls=":")
        ax.set_title(title)
        ax.legend(fontsize=8)
    step, d = traces[16]
    T = step.shape[0]
    for lvl, (name, style) in enumerate((("high", "-"), ("low", "--"))):
        for (lo, hi), c in zip(((13, 20), (21, 30), (31, 99)), ("tab:green", "tab:purple", "tab:red")):
            sel = (d >= lo) & (d <= hi)
            if sel.any():
                med = step[:, lvl, sel].median(dim=1).values.clamp_min(1e-12)
                axes[2].semilogy(range(1, T + 1), med.numpy(), style, color=c,
                                 label=f"{name}, d {bucket_name(lo, hi)}")
    axes[2].axhline(tol, color="gray", lw=0.8, ls=":")
    axes[2].set_xlabel("pass of f")
    axes[2].set_title("two-timescale, 16×16: median relative step per level")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: dict) -> str:
    lines = [f"parameters: single {out['params']['single']}, two-timescale {out['params']['two-timescale']}",
             "| model | accuracy | d > 12 | mean passes | mean block calls | passes per BFS step | converged |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in out["results"].items():
        conv = {k: v["converged_fraction"] for k, v in r["stats"].items()}
        lines.append(f"| {key} | {r['accuracy']:.3f} | {r['accuracy_harder_than_training']:.3f} | "
                     f"{r['mean_passes']:.1f} | {r['mean_block_calls']:.1f} | {r['passes_per_difficulty']:.2f} | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in conv.items()) + " |")
    lines.append("| bucket | " + " | ".join(f"{k} acc / passes" for k in out["results"]) + " |")
    lines.append("|---|" + "---:|" * len(out["results"]))
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    for nm in names:
        cells = []
        for r in out["results"].values():
            b = r["by_bucket"].get(nm)
            cells.append("—" if b is None else f"{b['accuracy']:.2f} / {b['mean_passes']:.1f} (n={b['count']})")
        lines.append(f"| {nm} | " + " | ".join(cells) + " |")
    s = out["settling"]
    lines.append(f"settling (two-timescale, relative step <= {s['tol']}): " + "; ".join(
        f"{k}: high at pass {v['high_mean']:.1f}, low at {v['low_mean']:.1f}, low first in "
        f"{v['low_first']:.0%}, same pass {v['same']:.0%}" for k, v in s["by_size"].items()))
    for key, v in out["diagnose"].items():
        lines.append(f"diagnose {key}: {v['healthy']}/{v['samples']} healthy, flags {v['flags']}, "
                     f"spectral radius median {v['spectral_radius_median']:.3f} max {v['spectral_radius_max']:.3f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="tiny test sets (for the test suite)")
    ap.add_argument("--figure", default=os.path.join(ROOT, "docs", "figures", "hierarchical.png"),
                    help="'' for none")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "hierarchical.json"), help="'' for none")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(steps=args.steps)
    if args.small:
        cfg.n_test, cfg.n_diagnose = {8: 16, 16: 8}, {8: 4, 16: 4}
    t0, cpu0 = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(7)
    tests = {8: generate(cfg.n_test[8], 8, rng),
             16: generate(cfg.n_test[16], 16, rng, max_difficulty=48)}
    torch.manual_seed(cfg.seed)
    models = {"single": SingleTimescale(32, 2), "two-timescale": TwoTimescale(22, 2, cfg.low_steps)}
    out: dict = {"config": {k: v for k, v in vars(cfg).items()}, "params": {k: n_params(m) for k, m in models.items()},
                 "results": {}, "losses": {}}
    for key, model in models.items():
        def bar(i: int, loss: float, key: str = key) -> None:
            if i % 50 == 0 or i == cfg.steps:
                print(f"  {key}: step {i}/{cfg.steps}, loss {loss:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
        out["losses"][key] = train(model, cfg, bar)
        res = evaluate(model, tests, cfg.budget[key], cfg.rtol)
        res["blocks_per_pass"] = model.blocks_per_pass
        out["results"][key] = res
    two = models["two-timescale"]
    traces = level_traces(two, tests, cfg.budget["two-timescale"])
    out["settling"] = {"tol": cfg.rtol, "by_size": {}}
    for n, (step, d) in traces.items():
        high, low = settle_pass(step[:, 0], cfg.rtol), settle_pass(step[:, 1], cfg.rtol)
        out["settling"]["by_size"][f"{n}x{n}"] = {
            "high_mean": float(high.double().mean()), "low_mean": float(low.double().mean()),
            "low_first": float((low < high).double().mean()), "same": float((low == high).double().mean()),
            "high_first": float((high < low).double().mean())}
    out["diagnose"] = diagnose_levels(two, tests, cfg)
    out["runtime_seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - cpu0
    out["load_average"] = os.getloadavg()
    out["command"] = "python examples/hierarchical.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out["torch"] = torch.__version__
    text = report(out)
    print(text)
    if args.figure:
        make_figure(out["results"], traces, cfg.rtol, args.figure)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
    print(f"total {out['runtime_seconds']:.0f} s wall, {out['cpu_seconds']:.0f} s CPU, "
          f"load average {out['load_average'][0]:.1f}")
    return out


if __name__ == "__main__":
    main()
