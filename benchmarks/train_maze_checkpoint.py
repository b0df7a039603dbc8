"""Train the small looped maze model that the maze stream of benchmarks/stream.py runs.

The halting study's recipe (examples/halting/training.py, `train_trunk`, "difficulty" recipe, QUICK
sizes): 8x8 mazes with BFS depth <= 12, seed 0, one torch thread, deterministic. Then, as the
study does, the fixed-point rule's tolerance (norm "inf") is chosen on fresh validation mazes of
both sizes: the largest rtol whose accuracy is within 0.5 point of plain iteration for
`max_passes` passes. Accuracy is reported on held-out 8x8 and 16x16 test mazes. Writes
benchmarks/data/maze_loop.pt: {"config", "state_dict", "rule", "train", "accuracy"}.

    python benchmarks/train_maze_checkpoint.py [--steps 220] [--out benchmarks/data/maze_loop.pt]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any, Dict, Tuple

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import fpsolve  # noqa: E402
from halting.rules import plain_run, step_rule  # noqa: E402
from halting.task import QUICK, as_tensors  # noqa: E402
from halting.training import train_trunk  # noqa: E402
from maze import MazeLoop, Mazes, generate  # noqa: E402

CHECKPOINT = os.path.join(HERE, "data", "maze_loop.pt")
SEED = 0
MAX_PASSES = 64
MAX_DIFFICULTY = 48
RTOLS = (0.3, 0.1, 3e-2, 1e-2, 1e-3, 1e-4)   # the study's sweep, loosest first


def load(path: str = CHECKPOINT) -> Tuple[MazeLoop, Dict[str, Any]]:
    """The trained MazeLoop (eval mode) and the checkpoint's metadata (rule, accuracy, ...)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = MazeLoop(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    return model.eval(), {k: v for k, v in ck.items() if k != "state_dict"}


def choose_rtol(model: MazeLoop, val: Dict[int, Mazes]) -> float:
    """The study's selection for fixed_point (inf): the loosest rtol whose validation accuracy
    is within 0.5 point of plain iteration after MAX_PASSES passes."""
    runs = [plain_run(model, {}, *as_tensors(m)[:2], MAX_PASSES) for m in val.values()]   # no halt heads
    target = float(torch.cat([r.correct[-1] for r in runs]).float().mean()) - 0.005
    for rtol in RTOLS:
        acc = torch.cat([step_rule(r, rtol, "inf").correct for r in runs]).float().mean()
        if float(acc) >= target:
            return rtol
    return RTOLS[-1]


def accuracy(model: MazeLoop, m: Mazes, rtol: float) -> Dict[str, float]:
    """Whole-maze accuracy of fixed-point halting (fpsolve.solve, per sample) and mean passes."""
    cells, labels, _ = as_tensors(m)
    with torch.no_grad():
        x = model.inputs(cells)
        sol = fpsolve.solve(model, torch.zeros_like(x[0]), x, solver="fixed_point", norm="inf", rtol=rtol,
                            max_iter=MAX_PASSES, backward="none")
        right = (model.predict(sol.z, x[1]) == labels).all(-1)
    return {"accuracy": float(right.float().mean()), "mean_passes": float(sol.iterations.float().mean()),
            "converged": float(sol.converged.float().mean()), "count": len(m)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=QUICK.steps)
    ap.add_argument("--out", default=CHECKPOINT)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = replace(QUICK, seeds=[SEED], steps=a.steps)
    t0 = time.time()
    model, losses, _ = train_trunk(cfg, SEED, "main", cfg.steps, recipe="difficulty")
    train_s = time.time() - t0
    rng = np.random.default_rng(777)   # held-out sets: a generator the training never uses
    val = {n: generate(cfg.n_val[n], n, rng, max_difficulty=MAX_DIFFICULTY) for n in (8, 16)}
    test = {n: generate(256, n, rng, max_difficulty=MAX_DIFFICULTY) for n in (8, 16)}
    rtol = choose_rtol(model, val)
    acc = {f"{n}x{n}": accuracy(model, m, rtol) for n, m in test.items()}
    config = {"dim": model.dim, "heads": cfg.heads, "residual_scale": model.core.residual_scale,
              "prenorm": True, "normalize_state": True, "sizes": (8, 16)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    torch.save({"config": config, "state_dict": model.state_dict(),
                "rule": {"solver": "fixed_point", "norm": "inf", "rtol": rtol, "max_iter": MAX_PASSES},
                "train": {"recipe": "difficulty", "seed": SEED, "steps": cfg.steps, "batch": cfg.batch,
                          "final_loss": float(np.mean(losses[-20:])), "seconds": round(train_s, 1)},
                "accuracy": acc}, a.out)
    print(f"trained {cfg.steps} steps in {train_s:.0f} s, loss {np.mean(losses[-20:]):.4f}; "
          f"fixed-point rule: norm inf, rtol {rtol}")
    for k, v in acc.items():
        print(f"  {k}: accuracy {v['accuracy']:.3f}, mean passes {v['mean_passes']:.1f}, "
              f"converged {v['converged']:.3f} ({v['count']} held-out mazes, BFS depth <= {MAX_DIFFICULTY})")
    print(f"wrote {os.path.relpath(a.out)} ({os.path.getsize(a.out) / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
