"""Problem 7 of BENCH.md: a looped language model decoding many prompts, tokens/s and accuracy.

Three decoders of the same model, prompts and cache of converged keys and values (the prompts'
joint prefills, solved by the residual rule as a stream of `slots` prompts in flight, are the
same solves in all three: `generate` pulls them as slots free, the two lock-step baselines run
them first):

- *fixed depth*: every token gets K passes of the core, no checks, `slots` prompts lock-step;
  K is the smallest depth as accurate as per-token halting (found on the same prompts);
- *sync*: per-token halting where the batch waits for its slowest token (a look every pass,
  halted rows frozen), as the recurrent-depth LM's own generation code does;
- *stream*: `fpsolve.generate` (depth-wise continuous batching).

The ideal is the fixed-depth time × mean passes per token ÷ K (halting whose bookkeeping is
free). Least wall time of alternating rounds, 1 thread. Writes the `looped_lm` key of
docs/benchmarks.json (and returns the markdown for docs/benchmarks.md).

    python benchmarks/lm_decoding.py [--repeats 5] [--prompts 256] [--quick] [--write]
    python benchmarks/lm_decoding.py --exactness   # forward substitution on the shipped model
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import fpsolve  # noqa: E402
from fpsolve._generate import DEFAULT_CHECK_EVERY, Prefill, pick_tokens  # noqa: E402
from fpsolve._looped_lm import KVCache  # noqa: E402
from fpsolve._options import SOLVE_DEFAULTS, Options  # noqa: E402

GOALS = {"stream / fixed": 1.8, "stream / sync": 1.3, "stream / ideal": 0.75, "accuracy drop (points)": 0.5}


class Setup:
    """The model, its prompts, the decoding options, and the task's judge of generated tokens."""

    def __init__(self, model: Any, prompts: List[List[int]], max_new: int, rtol: float, norm: str, max_iter: int,
                 judge: Callable[[List[List[int]], List[List[int]]], float], description: str,
                 temperature: float = 0.0, seed: int = 0, warm_start: bool = True) -> None:
        self.model, self.prompts, self.max_new, self.rtol, self.norm, self.max_iter = \
            model, prompts, max_new, rtol, norm, max_iter
        self.judge, self.description = judge, description
        self.temperature, self.seed, self.warm_start = temperature, seed, warm_start

    def options(self) -> Dict[str, Any]:
        return dict(rtol=self.rtol, norm=self.norm, max_iter=self.max_iter)


# ---- the two baselines: groups of `slots` prompts, one token per step for the whole group ----

def _pick(s: Setup, logits: Tensor, first: int, pos: Tensor) -> Tensor:
    """The next tokens as `generate` picks them (greedy, or seeded per prompt and position)."""
    return pick_tokens(logits, s.temperature, s.seed, list(range(first, first + logits.shape[0])), pos.tolist())


Prefilled = List[Tuple[List[Tuple[Tensor, Tensor]], int, Tensor]]


def prefill_all(s: Setup, slots: int) -> Prefilled:
    """Every prompt's prefill, as `generate` runs it (a stream of joint solves, `slots` prompts
    in flight): per prompt its cached keys and values per layer `[H, L, dh]`, its length and
    its last state `[1, d]`, in prompt order."""
    opts = Options.make("prefill", SOLVE_DEFAULTS, dict(solver="fixed_point", backward="none",
                                                        check_every=DEFAULT_CHECK_EVERY, **s.options()))
    out: List[Any] = [None] * len(s.prompts)
    with torch.no_grad():
        pre = Prefill(s.model, [torch.tensor(p) for p in s.prompts], opts, slots)
        while (got := pre.next()) is not None:
            index, _, _, kv, lengths, h = got
            for j, i in enumerate(index):
                out[i] = ([(k[j], v[j]) for k, v in kv], int(lengths[j]), h[j])
    return out


def _prefill(s: Setup, pre: Prefilled, first: int, n: int) -> Tuple[List[Tuple[Tensor, Tensor]], Tensor, Tensor,
                                                                   Tensor]:
    """The group's cache from the prefill (prompts `first` to `first + n`), positions, last
    states and first tokens."""
    m, group = s.model, pre[first:first + n]
    kv0 = group[0][0]
    cache = [tuple(k.new_zeros(n, k.shape[0], m.max_len, k.shape[2]) for _ in (0, 1)) for k, _ in kv0]
    for (ck, cv), i in zip(cache, range(len(kv0))):
        L = kv0[i][0].shape[1]
        ck[:, :, :L] = torch.stack([g[0][i][0] for g in group])
        cv[:, :, :L] = torch.stack([g[0][i][1] for g in group])
    lengths = torch.tensor([g[1] for g in group])
    h = torch.stack([g[2] for g in group])
    return cache, lengths, h, _pick(s, m.coda(h)[:, 0], first, lengths)


def _decode_group(s: Setup, pre: Prefilled, first: int, n: int, passes: Callable[..., Tuple[Tensor, Tensor]]
                  ) -> Tuple[List[List[int]], List[List[int]]]:
    """Decoding of one group (prompts `first`, ...), one token per step; `passes(h, e, cache)`
    solves a token's state for the whole group and returns (state, passes per row)."""
    m = s.model
    cache, pos, h, tok = _prefill(s, pre, first, n)
    out, its = [[t] for t in tok.tolist()], [[] for _ in range(n)]
    rows = torch.arange(n)
    for _ in range(s.max_new - 1):
        e = m.prelude(tok[:, None], pos[:, None])
        cap = int(pos.max()) + 1
        view = KVCache([(k[:, :, :cap], v[:, :, :cap]) for k, v in cache], pos)
        h, n = passes(h if s.warm_start else torch.zeros_like(h), e, view)
        for (ck, cv), (k, v) in zip(cache, m.keys_values(h, e, view)):
            ck[rows, :, pos], cv[rows, :, pos] = k[:, :, 0], v[:, :, 0]
        pos = pos + 1
        tok = _pick(s, m.coda(h)[:, 0], first, pos)
        for i, (t, k) in enumerate(zip(tok.tolist(), n.tolist())):
            out[i].append(t)
            its[i].append(k)
    return out, its


def fixed_passes(s: Setup, K: int) -> Callable[..., Tuple[Tensor, Tensor]]:
    """K passes of the core from the previous token's state, no checks."""
    def run(h: Tensor, e: Tensor, cache: KVCache) -> Tuple[Tensor, Tensor]:
        for _ in range(K):
            h = s.model.core(h, e, cache)
        return h, torch.full((h.shape[0],), K)
    return run


def sync_passes(s: Setup) -> Callable[..., Tuple[Tensor, Tensor]]:
    """Per-token residual rule, a look every pass; the batch waits for its slowest token."""
    def run(h: Tensor, e: Tensor, cache: KVCache) -> Tuple[Tensor, Tensor]:
        n = torch.zeros(h.shape[0], dtype=torch.int64)
        live = torch.ones(h.shape[0], dtype=torch.bool)
        for k in range(1, s.max_iter + 1):
            fh = s.model.core(h, e, cache)
            r = fpsolve._rules.sample_norm(fh - h, s.norm)
            met = r <= s.rtol * fpsolve._rules.sample_norm(fh, s.norm)
            n = torch.where(live, k, n)
            go = live & ~met   # (a row whose rule holds keeps the state it held at, as `generate`)
            h = torch.where(go[:, None, None], fh, h)
            live = go
            if not bool(live.any()):
                break
        return h, n
    return run


def count_decode_passes(s: Setup, run: Callable[[], Any]) -> int:
    """The core's calls with a cache (the token-by-token passes, not the prefill's) in one run."""
    core, n = s.model.core, [0]

    def counted(h: Tensor, e: Tensor, cache: Any = None) -> Tensor:
        n[0] += cache is not None
        return core(h, e, cache)
    s.model.core = counted
    try:
        with torch.no_grad():
            run()
    finally:
        del s.model.core
    return n[0]


def run_groups(s: Setup, slots: int, passes: Callable[..., Tuple[Tensor, Tensor]]
               ) -> Tuple[List[List[int]], List[List[int]]]:
    """Every prompt's prefill first, then `slots` prompts decoded together, a token per step."""
    tokens, its = [], []
    pre = prefill_all(s, slots)
    with torch.no_grad():
        for i in range(0, len(s.prompts), slots):
            t, k = _decode_group(s, pre, i, min(slots, len(s.prompts) - i), passes)
            tokens += t
            its += k
    return tokens, its


def run_generate(s: Setup, slots: int, check_every: Optional[int] = None) -> Tuple[List[List[int]], List[List[int]]]:
    out = sorted(fpsolve.generate(s.model, s.prompts, max_new_tokens=s.max_new, slots=slots, check_every=check_every,
                                  warm_start=s.warm_start, temperature=s.temperature, seed=s.seed, **s.options()),
                 key=lambda g: g.index)
    return [g.tokens for g in out], [g.iterations[1:] for g in out]


def smallest_equal_depth(s: Setup, slots: int, target: float, K_max: int) -> Tuple[int, float]:
    """The smallest fixed depth whose accuracy is within 0.5 point of `target` (bisection on a
    depth whose accuracy rises with K; the answer is checked)."""
    lo, hi = 1, K_max
    acc: Dict[int, float] = {}

    def ok(K: int) -> bool:
        if K not in acc:
            acc[K] = s.judge(s.prompts, run_groups(s, slots, fixed_passes(s, K))[0])
        return acc[K] >= target - 0.005
    while not ok(hi) and hi < 4 * K_max:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi, acc[hi]


def measure(s: Setup, slots: int, repeats: int, check_every: Optional[int] = None) -> Dict[str, Any]:
    with torch.no_grad():
        tok_stream, its_stream = run_generate(s, slots, check_every)
    acc_stream = s.judge(s.prompts, tok_stream)
    passes = np.array([k for row in its_stream for k in row], dtype=float)
    K_max = int(passes.max())
    K, acc_fixed = smallest_equal_depth(s, slots, acc_stream, K_max)
    tok_sync, its_sync = run_groups(s, slots, sync_passes(s))
    calls = count_decode_passes(s, lambda: run_generate(s, slots, check_every))
    methods = {
        "fixed": lambda: run_groups(s, slots, fixed_passes(s, K)),
        "sync": lambda: run_groups(s, slots, sync_passes(s)),
        "stream": lambda: run_generate(s, slots, check_every),
        "prefill": lambda: prefill_all(s, slots),   # (the same joint solves every decoder runs)
    }
    walls: Dict[str, List[float]] = {m: [] for m in methods}
    with torch.no_grad():
        for _ in range(repeats):
            for m, run in methods.items():
                t0 = time.perf_counter()
                run()
                walls[m].append(time.perf_counter() - t0)
    n_tokens = sum(len(t) for t in tok_stream)
    best = {m: min(w) for m, w in walls.items()}
    pre = best.pop("prefill")
    tps = {m: n_tokens / best[m] for m in ("fixed", "sync", "stream")}
    tps["ideal"] = tps["fixed"] * K / passes.mean()
    # the decoding alone: each decoder's time less the prompts' joint prefill (the same solves
    # in all three, timed on their own), where the ideal's scaling by passes holds
    dec = {m: n_tokens / (best[m] - pre) for m in ("fixed", "sync", "stream")}
    dec["ideal"] = dec["fixed"] * K / passes.mean()
    out = {
        "description": s.description, "prompts": len(s.prompts), "tokens": n_tokens, "slots": slots, "threads": 1,
        "fixed_depth": K, "rtol": s.rtol, "norm": s.norm, "max_iter": s.max_iter,
        "check_every": check_every or fpsolve._generate.DEFAULT_CHECK_EVERY,
        "tokens_per_s": tps, "decode_tokens_per_s": dec, "prefill_s": pre,
        "accuracy": {"fixed": acc_fixed, "sync": s.judge(s.prompts, tok_sync), "stream": acc_stream},
        "mean_passes_per_token": float(passes.mean()), "max_passes_per_token": K_max,
        "bound_K_over_mean_passes": K / float(passes.mean()),
        "stream_decode_passes": calls, "passes_sum_over_slots": float(passes.sum()) / slots,
        "sync_equal_sequences": sum(a == b for a, b in zip(tok_sync, tok_stream)) / len(tok_stream),
        "wall_s": best,
    }
    out["ratios"] = {"stream / fixed": tps["stream"] / tps["fixed"], "stream / sync": tps["stream"] / tps["sync"],
                     "stream / ideal": tps["stream"] / tps["ideal"],
                     "accuracy drop (points)": 100 * (acc_fixed - acc_stream)}
    out["decode_ratios"] = {k: dec[a] / dec[b] for k, (a, b) in
                            (("stream / fixed", ("stream", "fixed")), ("stream / sync", ("stream", "sync")),
                             ("stream / ideal", ("stream", "ideal")))}
    return out


def markdown(r: Dict[str, Any]) -> List[str]:
    t, a, dec = r["tokens_per_s"], r["accuracy"], r["decode_tokens_per_s"]
    lines = [f"{r['description']} {r['prompts']} prompts, {r['tokens']} generated tokens, {r['slots']} slots, "
             f"1 thread; residual rule rtol {r['rtol']:g} ({r['norm']}), max_iter {r['max_iter']}, looks every "
             f"{r['check_every']} passes. Least wall time of alternating rounds.", "",
             f"The prompts' joint prefills (the same stream of solves, {r['slots']} prompts in flight, in all three "
             f"decoders) take {r['prefill_s']:.2f} s "
             "of each run; *decoding alone* leaves them out.", "",
             "| decoder | tokens/s | decoding alone, tokens/s | accuracy | passes per token |",
             "|---|---:|---:|---:|---:|",
             f"| fixed depth K = {r['fixed_depth']} (smallest as accurate as halting) | {t['fixed']:.0f} | "
             f"{dec['fixed']:.0f} | {100 * a['fixed']:.1f}% | {r['fixed_depth']} |",
             f"| per-token halting, batch waits for its slowest token | {t['sync']:.0f} | {dec['sync']:.0f} | "
             f"{100 * a['sync']:.1f}% | {r['mean_passes_per_token']:.2f} (the batch: its slowest) |",
             f"| `fpsolve.generate` (depth-wise continuous batching) | {t['stream']:.0f} | {dec['stream']:.0f} | "
             f"{100 * a['stream']:.1f}% | {r['mean_passes_per_token']:.2f} |",
             f"| ideal (fixed × K ÷ mean passes) | {t['ideal']:.0f} | {dec['ideal']:.0f} | | |", "",
             "| goal | measured | decoding alone | |", "|---|---:|---:|---|"]
    for name, goal in GOALS.items():
        v = r["ratios"][name]
        d = r["decode_ratios"].get(name)
        ok = [(x <= goal if "drop" in name else x >= goal) for x in (v, d) if x is not None]
        verdict = "met" if all(ok) else "**not met** end to end; met decoding alone" if ok[-1] else "**not met**"
        lines.append(f"| {name} {'≤' if 'drop' in name else '≥'} {goal} | {v:.2f} | "
                     f"{'' if d is None else f'{d:.2f}'} | {verdict} |")
    lines += ["", f"The bound K ÷ mean passes per token is {r['bound_K_over_mean_passes']:.2f}: no halting "
              f"decoder can beat fixed depth by more on this task. `generate` ran {r['stream_decode_passes']} passes "
              f"of the core at [{r['slots']}, 1, d] for {r['passes_sum_over_slots']:.0f} passes' worth of work "
              f"(Σ passes ÷ slots): the rest are passes a halted slot idles until the next look, and the "
              f"stream's tail. Per-token tokens and iterations of the sync "
              f"decoder equal `generate`'s in {100 * r['sync_equal_sequences']:.0f}% of the sequences (float32 rounding "
              f"in a batch of another shape can move a sampled token or a stopping pass; each decoder's accuracy "
              f"is its own)."]
    return lines


SECTION = "## Problem 7: a looped language model decoding, per-token halting (1 thread)"


def write(r: Dict[str, Any], lines: List[str]) -> None:
    """The `looped_lm` key of docs/benchmarks.json and problem 7's section of docs/benchmarks.md
    (the rest of both files is kept; `make bench` writes them whole)."""
    md = os.path.join(ROOT, "docs", "benchmarks.md")
    text = open(md).read() if os.path.exists(md) else "# Benchmarks\n"
    text = text.split(SECTION)[0].rstrip("\n") + "\n\n" + "\n".join([SECTION, ""] + lines) + "\n"
    with open(md, "w") as fh:
        fh.write(text)
    path = os.path.join(ROOT, "docs", "benchmarks.json")
    data: Any = {}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
    if isinstance(data, list):
        data = {"problems": data}
    data["looped_lm"] = r
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


def build(quick: bool, n_prompts: int, path: Optional[str] = None) -> Setup:
    """The shipped checkpoint and its task (benchmarks/train_looped_lm.py, examples/lm_task.py):
    prompts as a server meets them (1 to 3 complete queries, then a query cut at any of its
    tokens), 16 new tokens each, sampled at temperature 0.5 (seeded per prompt and position, so
    every decoder draws the same random numbers: where their logits agree, their tokens do),
    judged against the `s k` before each `=` whoever wrote them."""
    import train_looped_lm   # noqa: E402
    from lm_task import DESCRIPTION, Task, judge   # noqa: E402
    model, meta = train_looped_lm.load(path or train_looped_lm.CHECKPOINT)
    task = Task(**meta["task"])
    prompts = task.mixed_prompts(64 if quick else n_prompts, seed=1234)

    def accuracy(prompts: List[List[int]], tokens: List[List[int]]) -> float:
        marks = [ok for p, t in zip(prompts, tokens) for _, _, ok in judge(task, p, t)]
        return sum(marks) / max(1, len(marks))
    rule = meta["rule"]
    return Setup(model, prompts, 16, rule["rtol"], rule["norm"], rule["max_iter"], accuracy,
                 DESCRIPTION + " Sampled at temperature 0.5 (seeded per prompt and position); answers judged "
                 "against the `s k` before each `=`, the model's own included.",
                 temperature=0.5, seed=7, warm_start=rule.get("warm_start", True))


def exactness(n: int = 16) -> None:
    """Forward substitution on the shipped model (docs/looped_lm.md): the keys `generate` caches
    against those of the joint fixed point of each whole sequence (relative error), at the
    benchmark's tolerance, at 1e-4 (float32) and at 1e-8 (float64); and in float64 whether 64
    decoded sequences' greedy tokens are the joint solve's."""
    import train_looped_lm   # noqa: E402
    from lm_task import Task   # noqa: E402
    from fpsolve._generate import _Decoder   # (the decoder itself: its cache is what is checked)
    model, meta = train_looped_lm.load()
    task = Task(**meta["task"])
    prompts = task.mixed_prompts(n, seed=3)
    for dt, rtol in ((torch.float32, meta["rule"]["rtol"]), (torch.float32, 1e-4), (torch.float64, 1e-8)):
        m, errs = model.to(dt), []
        for p in prompts:
            opts = Options.make("exactness", SOLVE_DEFAULTS, {"rtol": rtol, "max_iter": 2000, "backward": "none",
                                                              "check_every": 4})
            dec = _Decoder(m, [torch.tensor(p)], opts, 1, 12, False, None, 0.0, 0, False)
            (g,) = list(dec.run())
            T = int(dec.pos[0])
            seq = torch.tensor([p + g.tokens])[:, :T]
            with torch.no_grad():
                e = m.prelude(seq, torch.arange(T)[None])
                joint = fpsolve.solve(lambda h, e: m.core(h, e), torch.zeros_like(e), e,
                                      rtol=1e-11 if dt == torch.float64 else 1e-6, max_iter=5000)
                k_joint = m.keys_values(joint.z, e)[0][0][0]
            errs.append(float((dec.cache[0][0][0, :, :T] - k_joint).norm() / k_joint.norm()))
        print(f"{dt}, rtol {rtol:g}: cached keys against the joint fixed point's, relative error "
              f"mean {np.mean(errs):.2g}, max {max(errs):.2g} ({n} prompts)")
    m = model.double()
    many = task.mixed_prompts(64, seed=3)
    out = sorted(fpsolve.generate(m, many, max_new_tokens=12, rtol=1e-9, max_iter=2000, warm_start=False),
                 key=lambda g: g.index)
    same = 0
    for p, g in zip(many, out):
        with torch.no_grad():
            logits, _ = m(torch.tensor([p + g.tokens]), rtol=1e-11, max_iter=5000)
        same += logits[0, len(p) - 1:-1].argmax(-1).tolist() == g.tokens
    print(f"float64: greedy tokens equal to the joint solve's in {same} of {len(many)} sequences")


def breakdown(s: Setup, slots: int, check_every: Optional[int] = None, rounds: int = 3) -> None:
    """Where `generate`'s wall time goes (docs/looped_lm.md): the prefill stream, the decoding
    passes (and the core alone within them), the looks with the read-out of the halted tokens,
    and the slots' occupancy (slot-passes a halted slot idles until the look, and empty ones in
    the tail, where fewer sequences than slots remain). Timers around the decoder's own
    methods; the least total of `rounds` runs."""
    import fpsolve._generate as gen_mod
    import fpsolve._stream as stream_mod
    acc: Dict[str, List[float]] = {}
    occupancy: List[int] = []
    saved: List[Tuple[Any, str, Any]] = []

    def add(label: str, dt: float) -> None:
        c = acc.setdefault(label, [0, 0.0])
        c[0] += 1
        c[1] += dt

    def timed(owner: Any, name: str, label: Callable[..., str]) -> None:
        f = getattr(owner, name)
        saved.append((owner, name, f))

        def run(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = f(*a, **k)
            add(label(*a, **k), time.perf_counter() - t)
            return out
        setattr(owner, name, run)

    def loop_kind(loop: Any) -> str:
        return "decode" if loop.x_leaves[0].shape[1] == 1 else "prefill"

    def passes_label(loop: Any) -> str:
        if loop_kind(loop) == "decode":
            occupancy.append(int(loop.st.active.sum()))
        return loop_kind(loop) + " passes"
    timed(stream_mod._SlotLoop, "passes", passes_label)
    timed(stream_mod._SlotLoop, "look", lambda loop: loop_kind(loop) + " looks")
    timed(gen_mod.Prefill, "next", lambda *a: "prefill")
    timed(gen_mod._Decoder, "advance", lambda *a: "read-out")
    core = type(s.model).core
    last: List[Any] = []

    def spy(h: Tensor, e: Tensor, cache: Any = None) -> Tensor:
        if cache is not None:
            last[:] = [h, e, cache]
        return core(s.model, h, e, cache)
    s.model.core = spy   # (an instance attribute, timed)
    timed(s.model, "core", lambda h, e, cache=None: "core, prefill" if cache is None else "core, decode")
    try:
        best: Optional[Tuple[float, Dict[str, List[float]], List[int], Any]] = None
        for _ in range(rounds + 1):
            acc.clear()
            occupancy.clear()
            t0 = time.perf_counter()
            out = run_generate(s, slots, check_every)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, {k: list(v) for k, v in acc.items()}, list(occupancy), out)
    finally:
        for owner, name, f in reversed(saved):
            setattr(owner, name, f)
        del s.model.core
    total, a, occ, (tokens, its) = best
    K = check_every or gen_mod.DEFAULT_CHECK_EVERY
    work = sum(sum(k) for k in its)
    windows = len(occ)
    print(f"generate, {slots} slots, looks every {K} passes: {total:.3f} s for {sum(len(t) for t in tokens)} tokens")
    print(f"  prefill stream (passes, looks, keys and values): {a['prefill'][1]:.3f} s, "
          f"of which the core {a['core, prefill'][1]:.3f} s ({a['core, prefill'][0]} passes)")
    with torch.no_grad():   # (a decoding pass's core call again, on its own: warm caches)
        for _ in range(20):
            core(s.model, *last)
        t0 = time.perf_counter()
        for _ in range(200):
            core(s.model, *last)
        alone = (time.perf_counter() - t0) / 200
    print(f"  decoding passes: {a['decode passes'][1]:.3f} s ({windows * K}), "
          f"of which the core {a['core, decode'][1]:.3f} s ({1e3 * a['core, decode'][1] / a['core, decode'][0]:.3f} ms "
          f"a call; the last call again on its own: {1e3 * alone:.3f} ms)")
    print(f"  decoding looks: {a['decode looks'][1]:.3f} s ({a['decode looks'][0]}); the halted tokens' read-out "
          f"(cache, next token, embedding): {a['read-out'][1]:.3f} s")
    print(f"  the rest (refills, staging, results): "
          f"{total - a['prefill'][1] - a['decode passes'][1] - a['decode looks'][1] - a['read-out'][1]:.3f} s")
    print(f"  slot-passes: {windows * K * slots} run; {work} solving tokens, {K * sum(occ) - work} idle until a "
          f"look, {K * (windows * slots - sum(occ))} empty (the tail)")


def main(argv: Optional[List[str]] = None) -> Tuple[Dict[str, Any], List[str]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--check-every", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--write", action="store_true", help="write the looped_lm key of docs/benchmarks.json")
    ap.add_argument("--exactness", action="store_true", help="only the forward-substitution check (no timing)")
    ap.add_argument("--breakdown", action="store_true", help="only where generate's time goes (timers, no baselines)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.exactness:
        exactness()
        return {}, []
    s = build(args.quick, args.prompts, args.checkpoint)
    if args.breakdown:
        breakdown(s, args.slots, args.check_every)
        return {}, []
    r = measure(s, args.slots, 2 if args.quick else args.repeats, args.check_every)
    lines = markdown(r)
    print("\n".join(lines))
    if args.write:
        write(r, lines)
    return r, lines


if __name__ == "__main__":
    main()
