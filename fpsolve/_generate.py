"""`fpsolve.generate`: decoding where each new token's core state is solved to its own fixed point.

The prompt is prefilled as one joint solve (padded positions are held fixed, so a row's solve
sees only its own tokens) and the converged keys and values of its positions go into a cache
that holds one entry per position and core layer. Each new token is then solved alone, by any
criterion, against that cache: forward substitution on the joint fixed point of the sequence
(token t depends only on earlier tokens). A token whose state halts is read out by the coda,
the next token is picked, and its converged keys and values join the cache.

The rows of a group of prompts are solved together with per-sample halting, so a row's
iterations and tokens do not depend on its batch mates; a group advances one token per step
for all its live rows (depth-wise continuous batching, where a slot whose token halted moves on
at the next pass, is not built yet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional

import torch
from torch import Tensor

from ._checks import as_bool, as_float, as_int
from ._looped_lm import KVCache, check_tokens
from ._options import SOLVE_DEFAULTS, Options
from ._solution import Status
from ._solve import solve_with


@dataclass
class Generation:
    """One prompt's result from `generate`.

    Attributes:
        index: The prompt's position in `prompts`.
        tokens: The generated token ids (the prompt excluded).
        iterations: Per generated token, the evaluations of the core that the state it was read
            from received (for the first, the prompt's joint prefill).
        status: Per generated token, the `Status` of that state (a `DIVERGED` state ends the
            sequence: no token is read from it).
        prompt_iterations: Evaluations of the core for the prompt's joint prefill.
        finish: Why it ended: "length" (max_new_tokens), "stop" (stop_token), "context" (the
            model's max_len), or "diverged" (the next state turned non-finite or blew up).

    Example:
        ```python
        torch.manual_seed(0)
        lm = fpsolve.LoopedLM(vocab_size=11, width=32, heads=4).eval()
        (g,) = fpsolve.generate(lm, [[1, 2, 3]], max_new_tokens=3)
        assert len(g.tokens) == len(g.iterations) == len(g.status) == 3
        print(g.tokens, g.iterations, g.finish)
        ```
    """

    index: int
    tokens: List[int]
    iterations: List[int]
    status: List[Status]
    prompt_iterations: int
    finish: str = "length"


def generate(model: Any, prompts: Iterable[Any], *, max_new_tokens: int, slots: int = 8, criterion: Any = None,
             max_iter: int = 50, min_iter: Optional[int] = None, warm_start: bool = True, solver: Any = "fixed_point",
             rtol: float = 1e-4, atol: float = 0.0, norm: str = "l2", stop_token: Optional[int] = None,
             temperature: float = 0.0, seed: Optional[int] = None) -> Iterator[Generation]:
    """Decode every prompt, each new token's core state solved to its own fixed point.

    Greedy by default (`temperature=0`); with `temperature > 0`, tokens are sampled from
    softmax(logits / temperature) with a generator seeded by `seed`. Runs without gradients.

    Args:
        model: A `fpsolve.LoopedLM`, or a model with the same protocol (prelude, core,
            keys_values, coda, vocab_size, max_len; see `fpsolve._looped_lm`).
        prompts: An iterable of prompts, each a 1-D sequence of token ids (a tensor or a list).
        max_new_tokens: The most tokens generated per prompt (>= 1).
        slots: How many prompts are decoded together (>= 1).
        criterion: None (the residual rule) or a criterion object, e.g.
            `fpsolve.OutputKL(lambda h: model.coda(h), tol)` or `fpsolve.Stable(...)`.
        max_iter: The most evaluations of the core per token.
        min_iter: None, or the fewest evaluations per token before its criterion may stop it.
        warm_start: Start each token's state from the previous token's converged state (else zeros).
        solver: The solver of each token's solve.
        rtol: The residual rule's relative tolerance.
        atol: The residual rule's absolute tolerance.
        norm: "l2" or "inf".
        stop_token: A token id that ends a sequence (it is included in `tokens`), or None.
        temperature: 0 for greedy decoding, else the sampling temperature.
        seed: The sampling generator's seed (with temperature > 0).

    Yields:
        One `Generation` per prompt, in prompt order within each group of `slots`.

    Raises:
        TypeError: a prompt that is not a sequence of integer ids.
        ValueError: an empty prompt, a prompt longer than the model's context, ids outside the
            vocabulary, `max_new_tokens` < 1, or any bad solve option (before any work).

    Example:
        ```python
        torch.manual_seed(0)
        lm = fpsolve.LoopedLM(vocab_size=11, width=32, heads=4).eval()
        out = list(fpsolve.generate(lm, [[1, 2, 3], [4, 5]], max_new_tokens=4))
        print([g.tokens for g in out], [g.iterations for g in out])
        ```
    """
    max_new_tokens = as_int("max_new_tokens", max_new_tokens)
    slots = as_int("slots", slots)
    warm_start = as_bool("warm_start", warm_start)
    temperature = as_float("temperature", temperature)
    opts = Options.make("generate", SOLVE_DEFAULTS, dict(
        solver=solver, atol=atol, rtol=rtol, max_iter=max_iter, norm=norm, criterion=criterion, min_iter=min_iter,
        backward="none"))
    items = [_as_prompt(p, model, i) for i, p in enumerate(prompts)]   # (validated before any work)
    gen = None if temperature == 0.0 else torch.Generator(device=_device(model)).manual_seed(
        0 if seed is None else as_int("seed", seed, minimum=0))
    return _decode(model, items, max_new_tokens, slots, opts, warm_start, stop_token, temperature, gen)


def _decode(model: Any, items: List[Tensor], max_new: int, slots: int, opts: Options, warm: bool,
            stop: Optional[int], temperature: float, gen: Optional[torch.Generator]) -> Iterator[Generation]:
    with torch.no_grad():
        for start in range(0, len(items), slots):
            yield from _Group(model, items[start:start + slots], start, opts, warm, temperature, gen).run(max_new, stop)


class _Group:
    """Up to `slots` prompts decoded together: the prefill, then one token per step for the
    live rows, each token's state solved with per-sample halting against the rows' caches."""

    def __init__(self, model: Any, prompts: List[Tensor], first: int, opts: Options, warm: bool,
                 temperature: float, gen: Optional[torch.Generator]) -> None:
        self.model, self.opts, self.warm, self.temperature, self.gen = model, opts, warm, temperature, gen
        self.first, self.B = first, len(prompts)
        dev = prompts[0].device
        self.lengths = torch.tensor([len(p) for p in prompts], device=dev)
        L = int(self.lengths.max())
        self.tokens = torch.zeros(self.B, L, dtype=torch.int64, device=dev)
        for i, p in enumerate(prompts):
            self.tokens[i, :len(p)] = p

    def prefill(self) -> Tensor:
        """The prompts' joint solve (padded positions held fixed); the cache filled; returns the
        last real position's state per row `[B, 1, d]`."""
        m, B, L = self.model, self.B, self.tokens.shape[1]
        positions = torch.arange(L, device=self.tokens.device).expand(B, L)
        e = m.prelude(self.tokens, positions)
        valid = (positions < self.lengths[:, None]).unsqueeze(-1)
        f = lambda h, x: torch.where(x[1], m.core(h, x[0]), h)   # noqa: E731
        sol = solve_with(f, torch.zeros_like(e), (e, valid), self.opts.replace(criterion=None))
        self.prompt_iterations, self.prompt_status = sol.iterations.tolist(), sol.status.tolist()
        h = sol.z
        kv = m.keys_values(h, e)
        H, dh = kv[0][0].shape[1], kv[0][0].shape[3]
        self.cache = [tuple(torch.zeros(B, H, m.max_len, dh, dtype=k.dtype, device=k.device) for _ in (0, 1))
                      for k, _ in kv]
        for (ck, cv), (k, v) in zip(self.cache, kv):
            ck[:, :, :L], cv[:, :, :L] = k, v
        last = (self.lengths - 1).view(B, 1, 1).expand(B, 1, h.shape[2])
        return h.gather(1, last)

    def run(self, max_new: int, stop: Optional[int]) -> Iterator[Generation]:
        m, B = self.model, self.B
        h_last = self.prefill()
        # the first token is read from the prompt's last state: its depth is the prefill's
        out = [Generation(self.first + i, [], [self.prompt_iterations[i]], [Status(self.prompt_status[i])],
                          self.prompt_iterations[i]) for i in range(B)]
        live = torch.tensor([s != int(Status.DIVERGED) for s in self.prompt_status], device=h_last.device)
        for i in (~live).nonzero().flatten().tolist():
            out[i].finish, out[i].iterations, out[i].status = "diverged", [], []
        token = self._pick(m.coda(h_last)[:, 0])
        for _ in range(max_new):
            rows = live.nonzero().squeeze(1)
            for i, t in zip(rows.tolist(), token[rows].tolist()):
                out[i].tokens.append(t)   # (its depth and status were recorded with its state)
            ended = (token == stop) if stop is not None else torch.zeros_like(live)
            full = self.lengths >= m.max_len
            for i in rows[ended[rows] | full[rows]].tolist():
                out[i].finish = "stop" if bool(ended[i]) else "context"
            live &= ~ended & ~full
            if len(out[0].tokens) >= max_new or not bool(live.any()):
                break
            rows = live.nonzero().squeeze(1)
            h, sol = self.step(rows, token[rows], h_last[rows])
            for j, i in enumerate(rows.tolist()):
                out[i].iterations.append(int(sol.iterations[j]))
                out[i].status.append(Status(int(sol.status[j])))
            dead = sol.status == int(Status.DIVERGED)
            h_last = h_last.index_copy(0, rows, h)
            token = token.index_copy(0, rows, self._pick(m.coda(h)[:, 0]))
            live[rows[dead]] = False
            for i in rows[dead].tolist():
                out[i].finish = "diverged"
        for g in out:   # (the state solved after the last token was picked produced none)
            del g.iterations[len(g.tokens):], g.status[len(g.tokens):]
        yield from out

    def step(self, rows: Tensor, token: Tensor, h_prev: Tensor) -> Any:
        """Solve the next position's state of the rows `rows` against their caches; append its
        keys and values; returns (its state `[b, 1, d]`, the Solution)."""
        m, pos = self.model, self.lengths[rows]
        e = m.prelude(token[:, None], pos[:, None])
        cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        x = (e, [t for kv in cache for t in kv], pos)

        def f(h: Tensor, x: Any) -> Tensor:
            flat = x[1]
            return m.core(h, x[0], KVCache([(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)], x[2]))

        z0 = h_prev if self.warm else torch.zeros_like(e)
        sol = solve_with(f, z0, x, self.opts)
        kv = m.keys_values(sol.z, e, KVCache(cache, pos))
        at = pos.view(-1, 1, 1, 1)
        for (ck, cv), (k, v) in zip(self.cache, kv):
            index = at.expand(-1, k.shape[1], 1, k.shape[3])
            ck[rows] = ck[rows].scatter(2, index, k)
            cv[rows] = cv[rows].scatter(2, index, v)
        self.lengths[rows] += 1
        return sol.z, sol

    def _pick(self, logits: Tensor) -> Tensor:
        if self.temperature == 0.0:
            return logits.argmax(-1)
        p = torch.softmax(logits.float() / self.temperature, -1)
        return torch.multinomial(p, 1, generator=self.gen).squeeze(1)


def _as_prompt(p: Any, model: Any, i: int) -> Tensor:
    t = p if isinstance(p, Tensor) else torch.as_tensor(p)
    if t.ndim == 1 and t.numel() == 0:
        raise ValueError(f"prompts[{i}] is empty: give at least one token.")
    if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"prompts[{i}] must be a 1-D sequence of integer token ids; got {p!r:.60}.")
    check_tokens(t.to(torch.int64)[None], model, f"prompts[{i}]")
    return t.to(device=_device(model), dtype=torch.int64)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


__all__ = ["generate", "Generation"]
