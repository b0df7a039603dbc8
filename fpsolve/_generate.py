"""`fpsolve.generate`: decoding where each new token's core state is solved to its own fixed point.

A prompt is prefilled as one joint solve (padded positions are held fixed, so a row's solve
sees only its own tokens) and the converged keys and values of its positions go into a cache
that holds one entry per position and core layer. Each new token is then solved alone, by any
criterion, against that cache: forward substitution on the joint fixed point of the sequence
(token t depends only on earlier tokens). A token whose state halts is read out by the coda,
the next token is picked, and its converged keys and values join the cache.

Depth-wise continuous batching: `slots` sequences are in flight, each at its own token and
pass. The core runs at a fixed shape `[slots, 1, d]` through `stream`'s slot loop (no host
sync within a window of `check_every` passes; a look then finds each slot's exact stopping
pass). At a look, every slot whose token halted appends its keys and values, picks its next
token and starts that token's solve at the next pass; a finished sequence's slot takes the next
prompt. The prompts' joint solves run as a stream of their own (`Prefill`: `slots` prompts in
flight at `[slots, L, d]`, a prompt leaving when its solve stops), pulled only when a free slot
finds no prefilled prompt waiting: that is the only stall. A slot's tokens and iterations never
depend on its batch mates.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections import deque
from typing import Any, Deque, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._checks import as_bool, as_float, as_int
from ._criteria import Depth
from ._looped_lm import KVCache, check_tokens
from ._options import SOLVE_DEFAULTS, Options
from ._rules import index_tensor, rounding
from ._solution import Status
from ._stream import _Rows, _SlotLoop
from ._tree import StateLayout

#: The cached positions the core attends to: the live slots' longest, rounded up to a multiple
#: of this (a few distinct shapes; each costs attention over padding on a CPU).
CACHE_BLOCK = 8
#: Passes between looks when `check_every` is not given (measured best on BENCH.md's problem 7).
DEFAULT_CHECK_EVERY = 5


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
             temperature: float = 0.0, seed: Optional[int] = None, check_every: Optional[int] = None,
             compile: bool = False) -> Iterator[Generation]:
    """Decode every prompt, each new token's core state solved to its own fixed point.

    Greedy by default (`temperature=0`); with `temperature > 0`, tokens are sampled from
    softmax(logits / temperature), each with a generator seeded by (`seed`, the prompt's index,
    the position), so sampled tokens too do not depend on batch mates. Runs without gradients.

    Args:
        model: A `fpsolve.LoopedLM`, or a model with the same protocol (prelude, core,
            keys_values, coda, vocab_size, max_len; see `fpsolve._looped_lm`).
        prompts: An iterable of prompts, each a 1-D sequence of token ids (a tensor or a list).
        max_new_tokens: The most tokens generated per prompt (>= 1).
        slots: How many sequences are in flight (>= 1); the core always sees `[slots, 1, d]`.
        criterion: None (the residual rule) or a criterion object, e.g.
            `fpsolve.OutputKL(lambda h: model.coda(h), tol)`, `fpsolve.Stable(...)`, or
            `fpsolve.Depth(K)` (fixed depth: K passes per token, and for the prefill).
        max_iter: The most evaluations of the core per token.
        min_iter: None, or the fewest evaluations per token before its criterion may stop it.
        warm_start: Start each token's state from the previous token's converged state (else zeros).
        solver: The solver of each token's solve ("fixed_point", "anderson", "broyden").
        rtol: The residual rule's relative tolerance (also the prefill's).
        atol: The residual rule's absolute tolerance.
        norm: "l2" or "inf".
        stop_token: A token id that ends a sequence (it is included in `tokens`), or None.
        temperature: 0 for greedy decoding, else the sampling temperature.
        seed: The sampling seed (with temperature > 0).
        check_every: Passes between looks (a look finds each token's exact stopping pass; a
            halted slot idles until it); None: 5 (the fastest on the problem 7 benchmark, where 4
            and 6 were 3-9% slower). Tokens and iterations do not depend on it.
        compile: Compile the per-pass bookkeeping, as in `stream` (compiling the core is yours).

    Yields:
        One `Generation` per prompt, as its sequence finishes (`index` says which prompt).

    Raises:
        TypeError: a prompt that is not a sequence of integer ids.
        ValueError: an empty prompt, a prompt longer than the model's context, ids outside the
            vocabulary, `max_new_tokens` < 1, or any bad solve option (before any work).

    Example:
        ```python
        torch.manual_seed(0)
        lm = fpsolve.LoopedLM(vocab_size=11, width=32, heads=4).eval()
        out = sorted(fpsolve.generate(lm, [[1, 2, 3], [4, 5]], max_new_tokens=4), key=lambda g: g.index)
        print([g.tokens for g in out], [g.iterations for g in out])
        ```
    """
    max_new_tokens = as_int("max_new_tokens", max_new_tokens)
    slots = as_int("slots", slots)
    warm_start = as_bool("warm_start", warm_start)
    compile = as_bool("compile", compile)
    temperature = as_float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}.")
    if stop_token is not None:
        stop_token = as_int("stop_token", stop_token, minimum=0)
    seed = 0 if seed is None else as_int("seed", seed, minimum=0)
    opts = Options.make("generate", SOLVE_DEFAULTS, dict(
        solver=solver, atol=atol, rtol=rtol, max_iter=max_iter, norm=norm, criterion=criterion, min_iter=min_iter,
        backward="none", check_every=DEFAULT_CHECK_EVERY if check_every is None else check_every))
    if not getattr(opts.solver, "per_row", False):
        raise TypeError(f"generate: solver {opts.solver!r} cannot restart single rows (no `per_row = True`); "
                        f"use 'fixed_point', 'anderson' or 'broyden'.")
    items = [_as_prompt(p, model, i) for i, p in enumerate(prompts)]   # (validated before any work)
    return _Decoder(model, items, opts, slots, max_new_tokens, warm_start, stop_token, temperature, seed,
                    compile).run()


class _Decoder:
    """`slots` sequences in flight through one `_SlotLoop` (the passes and looks of `stream`).

    Per slot on the host: its `Generation` and its cached positions (`pos`); on the device: the
    cache (per core layer, keys and values `[slots, H, max_len, dh]`), and as the loop's input
    rows the injected embedding of the token being solved and its position."""

    def __init__(self, model: Any, items: List[Tensor], opts: Options, S: int, max_new: int, warm: bool,
                 stop: Optional[int], temperature: float, seed: int, compile: bool) -> None:
        self.model, self.items, self.opts, self.S, self.max_new = model, items, opts, S, max_new
        self.warm, self.stop, self.temperature, self.seed, self.compile = warm, stop, temperature, seed, compile
        self.gens: List[Optional[Generation]] = [None] * S
        self.pos = np.zeros(S, dtype=np.int64)
        self.cache: List[Tuple[Tensor, Tensor]] = []
        self.view: Optional[KVCache] = None
        self.staged: Deque[_Staged] = deque()
        # the prefill's rule: fixed depth stays fixed depth; any other criterion needs one row's
        # read-out, so a whole prompt is judged by the residual rule
        self.prefill_opts = opts.replace(criterion=opts.criterion if isinstance(opts.criterion, Depth) else None)
        self.prefill: Optional[Prefill] = None
        self.u: Optional[Tensor] = None

    @torch.no_grad()
    def run(self) -> Iterator[Generation]:
        done: List[Generation] = []
        self.prefill = Prefill(self.model, self.items, self.prefill_opts, self.S, self.compile)
        rows = self.admit(np.arange(self.S), done)
        yield from done
        if rows is None:
            return
        # the loop starts with every slot filled (slots left empty copy a live row, then retire)
        slots, e, pos, z = rows
        where = np.zeros(self.S, dtype=np.int64)
        where[slots] = np.arange(slots.size)
        where = index_tensor(where, e.device)
        e, pos, z = e.index_select(0, where), pos.index_select(0, where), z.index_select(0, where)
        layout = StateLayout(z)
        loop = _SlotLoop(layout.wrap(self.core, True), layout, _Structure(), None, [e, pos], z, self.S, self.S,
                         self.opts, rounding(layout.dtype, layout.work_dtype), self.compile)
        loop.retire(np.setdiff1d(np.arange(self.S), slots))
        e_buf, pos_buf = loop.x_leaves
        while True:
            self.grow(pos_buf)
            loop.passes()
            chunk, emit = loop.look()
            if chunk is None:
                continue
            done = []
            rows = self.advance(emit, layout.unpack(chunk.z), chunk.iterations, chunk.status, e_buf, done)
            loop.restart(emit)
            free = emit
            if rows is not None:
                loop.place(rows[0], rows[1:3], layout.pack(rows[3]))
                ended = np.zeros(self.S, dtype=bool)
                ended[emit] = True
                ended[rows[0]] = False
                free = np.flatnonzero(ended)
            more = self.admit(free, done) if free.size else None
            if more is not None:   # (admit fills the first free slots)
                loop.place(more[0], more[1:3], layout.pack(more[3]))
                free = free[more[0].size:]
            yield from done
            if not loop.retire(free):
                return

    def core(self, h: Tensor, x: Any) -> Tensor:
        """One pass of the core for every slot, attending to its cached positions."""
        return self.model.core(h, x[0], self.view)

    def grow(self, pos: Tensor) -> None:
        """The window's view of the cache: the cached positions the core attends to cover every
        slot's (they grow in blocks), and the slots' lengths `pos` (fixed until the next look)."""
        live = [s for s, g in enumerate(self.gens) if g is not None]
        need = int(self.pos[live].max()) + 1 if live else 1
        cap = min(self.model.max_len, -(-need // CACHE_BLOCK) * CACHE_BLOCK)
        self.view = KVCache([(k[:, :, :cap], v[:, :, :cap]) for k, v in self.cache], pos)

    def advance(self, slots: np.ndarray, h: Tensor, its: np.ndarray, codes: np.ndarray, e_buf: Tensor,
                done: List[Generation]) -> Optional[Tuple[np.ndarray, Tensor, Tensor, Tensor]]:
        """Slots whose token's state stopped: keys and values cached, the next token picked and
        recorded; returns the rows whose sequence goes on (slots, e, positions, start states)."""
        ok = codes != int(Status.DIVERGED)
        for s in slots[~ok]:
            self.close(self.gens[s], "diverged", done)
            self.gens[s] = None
        if not ok.any():
            return None
        slots, its, codes = slots[ok], its[ok], codes[ok]
        dev = h.device
        if not ok.all():
            h = h.index_select(0, index_tensor(np.flatnonzero(ok), dev))
        at = index_tensor(slots, dev)
        self.store(at, h, e_buf.index_select(0, at), self.pos[slots])
        self.pos[slots] += 1
        u = None if self.u is None else self.u[at, index_tensor(self.pos[slots], dev)]
        go, rows = self.read_out([self.gens[s] for s in slots], self.pos[slots], h, its, codes, done, u)
        for s in slots[~go]:
            self.gens[s] = None
        return None if rows is None else (slots[go],) + rows

    def read_out(self, gens: List[Generation], pos: np.ndarray, h: Tensor, its: Any, codes: Any,
                 done: List[Generation], u: Optional[Tensor] = None) -> Tuple[np.ndarray, Optional[Tuple[Tensor, Tensor, Tensor]]]:
        """Each sequence's next token, picked from its last state `h` `[n, 1, d]` and recorded
        (`pos`: its position; `u`: its sampling uniforms, if already looked up); returns which
        sequences go on and their next solve's rows (e, positions, start states)."""
        logits = self.model.coda(h)[:, 0]
        tok = pick_tokens(logits, self.temperature, self.seed, [g.index for g in gens], pos) if u is None else \
            sample(logits, self.temperature, u)
        go = np.zeros(len(gens), dtype=bool)
        for j, (g, t) in enumerate(zip(gens, tok.tolist())):
            g.tokens.append(t)
            g.iterations.append(int(its[j]))
            g.status.append(Status(int(codes[j])))
            why = "stop" if t == self.stop else "length" if len(g.tokens) >= self.max_new else \
                "context" if pos[j] >= self.model.max_len else None
            if why is None:
                go[j] = True
            else:
                self.close(g, why, done)
        if not go.any():
            return go, None
        if not go.all():
            keep = index_tensor(np.flatnonzero(go), h.device)
            tok, h = tok.index_select(0, keep), h.index_select(0, keep)
        p = index_tensor(pos[go], h.device)
        e = self.model.prelude(tok[:, None], p[:, None])
        return go, (e, p, h if self.warm else torch.zeros_like(e))

    def store(self, at: Tensor, h: Tensor, e: Tensor, pos: np.ndarray) -> None:
        """The converged keys and values of one new position per slot `at` into the cache."""
        lengths = index_tensor(pos, h.device)
        kv = self.model.keys_values(h, e, KVCache(_RowsOf(self.cache, at, int(pos.max())), lengths))
        for (ck, cv), (k, v) in zip(self.cache, kv):
            ck[at, :, lengths] = k[:, :, 0]
            cv[at, :, lengths] = v[:, :, 0]

    def admit(self, free: np.ndarray, done: List[Generation]) -> Optional[Tuple[np.ndarray, Tensor, Tensor, Tensor]]:
        """Prefilled prompts into the free slots (their keys and values into the slots' cache);
        returns the rows of their first solves. When none is waiting, the prefill stream runs
        to its next look that hands out prompts (decoding's only stall)."""
        out: List[Tuple[np.ndarray, Tensor, Tensor, Tensor]] = []
        while free.size:
            if not self.staged:
                if not self.stage(done):
                    break
                continue
            st = self.staged[0]
            n = min(free.size, st.left)
            slots, rows = free[:n], np.arange(st.taken, st.taken + n)
            st.taken += n
            if not st.left:
                self.staged.popleft()
            free = free[n:]
            at, sel = index_tensor(slots, st.e.device), index_tensor(rows, st.e.device)
            for (ck, cv), (k, v) in zip(self.cache, st.kv):
                L = k.shape[2]
                ck[at, :, :L], cv[at, :, :L] = k.index_select(0, sel), v.index_select(0, sel)
            for s, r in zip(slots, rows):
                self.gens[s] = st.gens[r]
            self.pos[slots] = st.pos[rows]
            if self.u is not None:
                keys = torch.tensor([st.gens[r].index for r in rows], device=at.device)[:, None]
                self.u[at] = uniforms(self.seed, keys, torch.arange(self.u.shape[1], device=at.device)[None])
            out.append((slots, st.e.index_select(0, sel), st.p.index_select(0, sel), st.z.index_select(0, sel)))
        if not out:
            return None
        return (np.concatenate([r[0] for r in out]),) + tuple(torch.cat([r[i] for r in out]) for i in (1, 2, 3))

    def stage(self, done: List[Generation]) -> bool:
        """The prompts the prefill stream hands out next, their first tokens picked: those whose
        sequence goes on wait in `self.staged` for a slot. False when every prompt is prefilled."""
        got = self.prefill.next() if self.prefill is not None else None
        if got is None:
            return False
        index, its, codes, kv, lengths, h_last = got
        if not self.cache:
            m = self.model
            self.cache = [tuple(k.new_zeros(self.S, k.shape[1], m.max_len, k.shape[3]) for _ in (0, 1)) for k, _ in kv]
            if self.temperature > 0:   # (each slot's sampling uniforms at every position, made once per prompt)
                self.u = torch.zeros(self.S, m.max_len + 1, dtype=torch.float64, device=h_last.device)
        gens = [Generation(int(i), [], [], [], int(k), "length") for i, k in zip(index, its)]
        ok = codes != int(Status.DIVERGED)
        for j in np.flatnonzero(~ok):
            self.close(gens[j], "diverged", done)
        rows = np.flatnonzero(ok)
        if not rows.size:
            return True
        dev = h_last.device
        pos = lengths[rows]
        sel = index_tensor(rows, dev)
        go, first_solves = self.read_out([gens[j] for j in rows], pos, h_last.index_select(0, sel), its[rows],
                                         codes[rows], done)
        if first_solves is not None:
            keep = index_tensor(rows[go], dev)
            self.staged.append(_Staged([gens[j] for j in rows[go]], [(k.index_select(0, keep), v.index_select(0, keep))
                                                                    for k, v in kv], pos[go], *first_solves))
        return True

    @staticmethod
    def close(g: Generation, why: str, done: List[Generation]) -> None:
        """A finished sequence: its reason recorded, its result handed out."""
        g.finish = why
        done.append(g)


class Prefill:
    """The prompts' prefill as a stream of joint solves, `slots` prompts in flight at the fixed
    shape `[slots, L, d]` (L: the longest prompt). A prompt's positions are solved together,
    its padding held fixed (the core is causal, so a prompt's solve sees only its own tokens);
    a prompt whose solve stops leaves at the next look and its slot takes the next prompt, so a
    hard prompt holds up only itself. Per prompt the result is its own joint solve's.

    `next()` runs to the next look that hands out prompts and returns, for them: their indices,
    iterations and status codes (numpy), per core layer their converged keys and values
    `[n, H, L, dh]`, their lengths (numpy) and last states `[n, 1, d]`; None when all are out.
    """

    def __init__(self, model: Any, prompts: List[Tensor], opts: Options, slots: int, compile: bool = False) -> None:
        self.model, self.prompts = model, prompts
        self.L = max((len(p) for p in prompts), default=1)
        self.chunks: Optional[Iterator[Tuple[Any, StateLayout]]] = None
        if not prompts:
            return
        rows = _Rows(self.inputs(slots))
        x_first, n0 = rows.take(slots)
        z_first = torch.zeros_like(x_first[0])
        layout = StateLayout(z_first)
        f = lambda h, x: torch.where(x[1], model.core(h, x[0]), h)   # noqa: E731
        self.chunks = _SlotLoop(layout.wrap(f, True), layout, rows, z_first[:1], x_first, z_first, n0, slots, opts,
                                rounding(layout.dtype, layout.work_dtype), compile).run()

    def padded(self, index: Any) -> Tuple[Tensor, Tensor, Tensor]:
        """These prompts' tokens padded to L, their positions, and which positions are real."""
        dev = self.prompts[0].device
        tokens = torch.zeros(len(index), self.L, dtype=torch.int64, device=dev)
        for j, i in enumerate(index):
            p = self.prompts[i]
            tokens[j, :len(p)] = p
        lengths = torch.tensor([len(self.prompts[i]) for i in index], device=dev)
        positions = torch.arange(self.L, device=dev).expand(len(index), self.L)
        return tokens, positions, positions < lengths[:, None]

    def inputs(self, slots: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """The stream's input rows, `slots` prompts at a time: (embedding, real positions)."""
        for first in range(0, len(self.prompts), slots):
            tokens, positions, valid = self.padded(range(first, min(first + slots, len(self.prompts))))
            yield self.model.prelude(tokens, positions), valid.unsqueeze(-1)

    def next(self) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, List[Tuple[Tensor, Tensor]], np.ndarray,
                                      Tensor]]:
        got = None if self.chunks is None else next(self.chunks, None)
        if got is None:
            return None
        chunk, layout = got
        index = chunk.rows
        z = layout.unpack(chunk.z)
        tokens, positions, _ = self.padded(index)
        lengths = np.array([len(self.prompts[i]) for i in index], dtype=np.int64)
        at = index_tensor(lengths - 1, z.device).view(-1, 1, 1).expand(-1, 1, z.shape[2])
        kv = self.model.keys_values(z, self.model.prelude(tokens, positions))
        return index, chunk.iterations, chunk.status, kv, lengths, z.gather(1, at)


def pick_tokens(logits: Tensor, temperature: float, seed: int, prompts: Any, positions: Any) -> Tensor:
    """The next tokens from logits `[n, vocab]`: argmax at temperature 0, else sampled from
    softmax(logits / temperature) by a uniform number that is a hash of (seed, prompt index,
    position), so a token never depends on what else is decoded beside it (and all rows are
    drawn in a few tensor ops, on the logits' device). Returns int64 `[n]`."""
    if temperature == 0.0:
        return logits.argmax(-1)
    dev = logits.device
    u = uniforms(seed, torch.as_tensor(prompts, dtype=torch.int64, device=dev),
                 torch.as_tensor(positions, dtype=torch.int64, device=dev))
    return sample(logits, temperature, u)


def uniforms(seed: int, prompts: Tensor, positions: Tensor) -> Tensor:
    """The uniform numbers on [0, 1) (float64) of (seed, prompt index, position): a counter-based
    hash (SplitMix64's finaliser, three rounds); `prompts` broadcasts against `positions`."""
    key = _mix(_mix(_mix(torch.full_like(prompts, seed)) ^ prompts) ^ positions)
    return _shr(key, 11).double() * 2.0 ** -53   # (the top 53 bits)


def sample(logits: Tensor, temperature: float, u: Tensor) -> Tensor:
    """Tokens drawn from softmax(logits / temperature) `[n, vocab]` by the uniforms u `[n]`."""
    cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp_(max=logits.shape[-1] - 1)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: Tensor, k: int) -> Tensor:
    """The logical right shift of int64 bits (as uint64)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on the bits of int64 tensors (their products wrap as uint64's
    do): a counter-based hash."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


class _Staged:
    """Prompts prefilled together, waiting for slots (the first `taken` have one): per prompt
    its result so far, its cached keys and values (rows of `kv`, per core layer), its length,
    and its first solve's rows (embedding `e`, position `p`, start state `z`)."""

    def __init__(self, gens: List[Generation], kv: List[Tuple[Tensor, Tensor]], pos: np.ndarray, e: Tensor,
                 p: Tensor, z: Tensor) -> None:
        self.gens, self.kv, self.pos, self.e, self.p, self.z = gens, kv, pos, e, p, z
        self.taken = 0

    @property
    def left(self) -> int:
        return len(self.gens) - self.taken


class _RowsOf:
    """The cache of some slots, its first `n` positions, selected only if a layer is read (a
    one-layer core's keys and values never read the cache)."""

    def __init__(self, cache: List[Tuple[Tensor, Tensor]], at: Tensor, n: int) -> None:
        self.cache, self.at, self.n = cache, at, n

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        k, v = self.cache[i]
        return k[:, :, :self.n].index_select(0, self.at), v[:, :, :self.n].index_select(0, self.at)


class _Structure:
    """The slot loop's view of the input rows: the leaves (embedding, position) as a pair."""

    @staticmethod
    def structure(leaves: List[Tensor]) -> Any:
        return tuple(leaves)


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
