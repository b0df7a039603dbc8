"""The study's entry point (run as `python examples/halting_study.py [--quick]`): the units
(one model each, trained and measured), the worker processes that run them, and the output.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import torch

from maze import MazeLoop, Mazes, generate

from .evaluation import evaluate, run_diagnose
from .figures import ROOT, make_figures
from .report import build_json, jsonable, print_results, summarize_ablation
from .task import FULL, HALT_HEADS, LOOSE_L2_RTOL, QUICK, RECIPE_LABELS, RECIPES, VARIANTS, Config
from .training import train_halt_head, train_trunk

DESCRIPTION = "Halting as root-finding on a looped transformer: fixed-point halting vs fixed depth vs ACT."


@dataclass(frozen=True)
class Unit:
    """One independent piece of the study: a model trained with one recipe, variant and seed,
    and everything measured on it (units run in parallel worker processes)."""

    recipe: str
    variant: str    # "main" or an ablation
    seed: int


class QueueBar:
    """Progress from a worker process: the two tqdm methods the training loops call, sent
    through a queue to the bar in the parent."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put((n, None))

    def set_postfix_str(self, text: str) -> None:
        self.queue.put((0, text))


def n_rule_settings(cfg: Config) -> int:
    return len(HALT_HEADS) * len(cfg.act_taus) + 3 * len(cfg.rtols) + len(cfg.anderson_rtols) + 2


def unit_cost(u: Unit, cfg: Config) -> int:
    """Progress-bar ticks of one unit (training steps, head steps, rule settings)."""
    if u.variant != "main":
        return cfg.ablation_steps + 1
    return cfg.steps + len(HALT_HEADS) * cfg.act_steps + n_rule_settings(cfg)


def run_unit(u: Unit, cfg: Config, tests: Dict[int, Mazes], val: Dict[int, Mazes], threads: int, bar) -> bytes:
    """Train one model and measure it; returns the results pickled (tensors by value)."""
    torch.set_num_threads(threads)
    if u.variant != "main":
        model, losses, _ = train_trunk(cfg, u.seed, u.variant, cfg.ablation_steps, bar, recipe=u.recipe)
        bar.set_postfix_str(f"diagnose {u.variant} seed {u.seed}")
        rows = run_diagnose(model, tests, cfg, cfg.default_rtol, restarts=0)
        bar.update(1)
        return pickle.dumps({"unit": u, "rows": rows, "final_loss": float(np.mean(losses[-20:]))})
    snap_at = (int(0.4 * cfg.steps), int(0.6 * cfg.steps)) if u.recipe == "difficulty" else ()
    model, losses, snaps = train_trunk(cfg, u.seed, "main", cfg.steps, bar, snapshot_at=snap_at, recipe=u.recipe)
    heads = {name: train_halt_head(model, cfg, u.seed, bar, train_only=name == "act_train_only")
             for name in HALT_HEADS}
    ev = evaluate(model, heads, tests, val, cfg, bar)
    bar.set_postfix_str(f"diagnose {u.recipe} seed {u.seed}")
    rtol = ev["chosen"]["fixed_point_inf"]
    probes = {}   # other sources of settled-but-wrong samples: part-trained weights, a loose criterion
    for step, state in snaps.items():
        half = MazeLoop(cfg.dim, cfg.heads)
        half.load_state_dict(state)
        probes[f"snapshot at step {step}"] = run_diagnose(half.eval(), tests, cfg, rtol)
    if u.recipe == "difficulty":
        probes[f"l2 criterion at rtol {LOOSE_L2_RTOL:g}"] = run_diagnose(model, tests, cfg, LOOSE_L2_RTOL, norm="l2")
    return pickle.dumps({
        "unit": u, "eval": ev, "extrapolated": ev["hard_accuracy_at_max"] >= 0.95,
        "final_loss": float(np.mean(losses[-20:])), "rows": run_diagnose(model, tests, cfg, rtol),
        "probe_rows": probes,
        "ablation_rows": run_diagnose(model, tests, cfg, cfg.default_rtol, restarts=0) if cfg.ablations else None})


def run_units(units: List[Unit], cfg: Config, tests, val, jobs: int, threads: int, bar) -> List[dict]:
    """Every unit, in `jobs` worker processes of `threads` torch threads each (1: in this one).
    Workers import `run_unit` from this module (spawned: they share nothing but the arguments)."""
    if jobs <= 1:
        return [pickle.loads(run_unit(u, cfg, tests, val, threads, bar)) for u in units]
    import concurrent.futures as cf
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(run_unit, u, cfg, tests, val, threads, QueueBar(queue)) for u in units]
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=1.0)
            while not queue.empty():
                n, text = queue.get()
                bar.update(n)
                if text:
                    bar.set_postfix_str(text)
        return [pickle.loads(f.result()) for f in futures]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="one seed, small sets, no ablations (<= 5 min)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    p.add_argument("--steps", type=int, help="override the training steps")
    p.add_argument("--recipes", nargs="*", choices=RECIPES, help="override the training recipes")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--ablations", nargs="*", choices=[v for v in VARIANTS if v != "main"],
                   help="override the ablations to run")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one model each (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (1 is fastest on a shared 2-core machine)")
    p.add_argument("--out", default=None, help="json path (full run default: docs/halting.json)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    """QUICK or FULL, with the command line's overrides."""
    cfg = QUICK if args.quick else FULL
    if args.seeds:
        cfg = replace(cfg, seeds=args.seeds)
    if args.steps:
        cfg = replace(cfg, steps=args.steps, ablation_steps=args.steps)
    if args.recipes:
        cfg = replace(cfg, recipes=tuple(args.recipes))
    if args.ablations is not None:
        cfg = replace(cfg, ablations=tuple(args.ablations))
    if args.no_ablation:
        cfg = replace(cfg, ablations=())
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    cfg = config_from(args)
    tag = "_quick" if args.quick else ""
    t0 = time.time()
    rng = np.random.default_rng(12345)
    tests = {n: generate(cfg.n_test[n], n, rng, max_difficulty=cfg.max_test_difficulty) for n in (8, 16)}
    val = {n: generate(cfg.n_val[n], n, rng, max_difficulty=cfg.max_test_difficulty) for n in (8, 16)}
    units = ([Unit(r, "main", s) for r in cfg.recipes for s in cfg.seeds]
             + [Unit("difficulty", v, s) for v in cfg.ablations for s in cfg.seeds])
    bar = tqdm(total=sum(unit_cost(u, cfg) for u in units), desc="halting study", unit="step",
               dynamic_ncols=True, mininterval=2.0)
    results = run_units(units, cfg, tests, val, min(args.jobs, len(units)), args.threads, bar)
    bar.close()
    runtime = time.time() - t0

    by_recipe = {r: [o for o in results if o["unit"].variant == "main" and o["unit"].recipe == r]
                 for r in cfg.recipes}
    ablation = summarize_ablation(results, cfg)
    print_results(by_recipe, ablation, cfg)
    figs = make_figures({RECIPE_LABELS[r]: outs[0]["eval"] for r, outs in by_recipe.items()}, cfg,
                        ablation or None, tag)
    print(f"\nfigures: {', '.join(os.path.relpath(f, ROOT) for f in figs)}")
    print(f"runtime {runtime:.0f} s")
    summary = build_json(by_recipe, results, ablation, cfg, runtime, args.quick)
    out = args.out or (None if args.quick else os.path.join(ROOT, "docs", "halting.json"))
    if out:
        with open(out, "w") as fh:
            json.dump(jsonable(summary), fh, indent=1)
        print(f"wrote {os.path.relpath(out, ROOT)}")
