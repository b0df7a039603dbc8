"""Decode with the shipped looped language model, each token halting at its own fixed point.

The model (benchmarks/data/looped_lm.pt, made by benchmarks/train_looped_lm.py) speaks the
iterated-permutation language of examples/lm_task.py: queries `s k = a ;` with a = pi^k(s), so
the `=` token's state needs about k passes and every other token a few. `fpsolve.generate`
solves each new token's core state to its fixed point against a cache of the earlier tokens'
converged keys and values, with `slots` sequences in flight. Printed: a few decoded prompts
with the passes each generated token took; accuracy and passes by the answer's k; warm against
cold starts; the smallest fixed depth as accurate. `make demo` runs `--quick`.

    python examples/looped_lm.py [--quick] [--prompts 256] [--plot docs/figures/looped_lm_passes.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
sys.path.insert(0, HERE)

import fpsolve  # noqa: E402
from lm_task import Task, judge  # noqa: E402
from train_looped_lm import load  # noqa: E402

BUCKETS = ((1, 3), (4, 7), (8, 15), (16, 32))


def decode(model: Any, prompts: List[List[int]], **options: Any) -> Tuple[List[fpsolve.Generation], float]:
    """Every prompt decoded (in prompt order) and the wall time."""
    t0 = time.perf_counter()
    out = sorted(fpsolve.generate(model, prompts, **options), key=lambda g: g.index)
    return out, time.perf_counter() - t0


def answers(task: Task, prompts: List[List[int]], out: List[fpsolve.Generation]) -> List[Tuple[int, bool, int]]:
    """(k, correct, passes) of every generated answer."""
    return [(k, ok, g.iterations[j]) for p, g in zip(prompts, out) for j, k, ok in judge(task, p, g.tokens)]


def passes_per_token(out: List[fpsolve.Generation]) -> float:
    """Mean passes of the tokens solved one at a time (the first is read from the prefill)."""
    its = [i for g in out for i in g.iterations[1:]]
    return float(np.mean(its))


def show(task: Task, prompt: List[int], g: fpsolve.Generation) -> None:
    words = [task.decode([t]) for t in g.tokens]
    w = max(4, max(len(x) for x in words) + 1)
    print("  prompt:   " + task.decode(prompt))
    print("  decoded:  " + "".join(x.rjust(w) for x in words))
    print("  passes:   " + "".join(str(i).rjust(w) for i in g.iterations))


def plot(task: Task, prompts: List[List[int]], out: List[fpsolve.Generation], path: str) -> None:
    """Passes per generated token along a few sequences, answers marked with their k."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(9, 7))
    for ax, p, g in zip(axes, prompts, out):
        marks = {j: k for j, k, _ in judge(task, p, g.tokens)}
        colors = ["tab:red" if j in marks else "tab:blue" for j in range(len(g.tokens))]
        ax.bar(range(len(g.tokens)), g.iterations, color=colors)
        for j, k in marks.items():
            ax.text(j, g.iterations[j], f"k={k}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(g.tokens)), [task.decode([t]) for t in g.tokens], fontsize=8)
        ax.set_ylabel("passes")
        ax.set_ylim(0, max(g.iterations) * 1.3 + 1)
    axes[0].set_title("passes per generated token (red: answers, which need about k passes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="64 prompts, a short fixed-depth sweep")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--plot", default=None, help="write the passes-per-token figure here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = load()
    task = Task(**meta["task"])
    rule = meta["rule"]
    print(f"model: LoopedLM width {model.width}, {sum(p.numel() for p in model.parameters())} parameters, "
          f"trained {meta['train']['seconds']:.0f} s; rule rtol {rule['rtol']:g} ({rule['norm']}), "
          f"max_iter {rule['max_iter']}, warm_start={rule['warm_start']}")
    n = 64 if args.quick else args.prompts
    prompts = task.mixed_prompts(n, seed=1234)   # 1-3 queries, then one cut anywhere
    # sampled at temperature 0.5, so the model writes queries of many difficulties (seeded per
    # prompt and position: the same tokens whatever else is decoded beside them)
    opts: Dict[str, Any] = dict(max_new_tokens=16, slots=args.slots, temperature=0.5, seed=7, **rule)
    out, wall = decode(model, prompts, **opts)
    a = answers(task, prompts, out)
    print(f"\n{n} prompts, {sum(len(g.tokens) for g in out)} tokens in {wall:.2f} s; three of them:")
    hardest = [max([k for _, k, _ in judge(task, p, g.tokens)] or [0]) for p, g in zip(prompts, out)]
    hard = sorted(range(n), key=lambda i: -hardest[i])
    for i in (hard[0], hard[n // 3], hard[-1]):
        show(task, prompts[i], out[i])
    print(f"\nanswers right: {np.mean([ok for _, ok, _ in a]):.3f} of {len(a)}; mean passes per token "
          f"{passes_per_token(out):.2f}; answers by k (right, mean passes):")
    for lo, hi in BUCKETS:
        sel = [(ok, it) for k, ok, it in a if lo <= k <= hi]
        if sel:
            print(f"  k {lo:2d}-{hi:2d}: {np.mean([o for o, _ in sel]):.3f}, {np.mean([i for _, i in sel]):5.1f} "
                  f"passes ({len(sel)} answers)")
    runs = {opts["warm_start"]: (out, a)}
    other, _ = decode(model, prompts, **{**opts, "warm_start": not opts["warm_start"]})
    runs[not opts["warm_start"]] = (other, answers(task, prompts, other))
    print("start of each token's state: " + "; ".join(
        f"{'previous token' if w else 'zeros'} (warm_start={w}): {passes_per_token(runs[w][0]):.2f} passes per token, "
        f"answers right {np.mean([o for _, o, _ in runs[w][1]]):.3f}" for w in (True, False)))
    target = np.mean([ok for _, ok, _ in a])
    for K in ((8, 16, 24, 32, 36, 40, 48) if args.quick else (4, 8, 12, 16, 20, 24, 28, 32, 34, 36, 38, 40, 44, 48)):
        fixed, t_fixed = decode(model, prompts, criterion=fpsolve.Depth(K), **{**opts, "max_iter": K})
        acc = np.mean([ok for _, ok, _ in answers(task, prompts, fixed)])
        print(f"fixed depth {K:2d}: answers right {acc:.3f}")
        if acc >= target - 0.005:
            print(f"the smallest fixed depth as accurate as halting: {K} (of those tried); "
                  f"K / mean passes per token = {K / passes_per_token(out):.2f}")
            break
    if args.plot:
        plot(task, [prompts[i] for i in hard[:4]], [out[i] for i in hard[:4]], args.plot)


if __name__ == "__main__":
    main()
