"""A synthetic language whose hard tokens need many passes of a looped core: iterated permutation.

A fixed random permutation `pi` of M symbols (one M-cycle, drawn once from the task's seed: part
of the language, learned into the weights). A sequence is `BOS` then queries `s k = a ;` with
`s` a symbol token, `k` a count token (1..KMAX, P(k) ~ 1/k so most are easy) and `a = pi^k(s)`.
The answer is predicted at the `=` token, whose own embedding carries no operand: its state reads
s and k from the two tokens before it and applies `pi` once per pass, so the answer needs about k
passes and the state stops moving once its counter reaches k.

Example:
    ```python
    task = Task()
    seqs = task.sequences(2, queries=3, seed=0)         # int64 [2, 1 + 5*3]
    prompts, ks = task.prompts(4, seed=1)               # each ends after `s k`
    print(task.decode(seqs[0].tolist()))
    ```
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

DESCRIPTION = ("Iterated permutation: queries `s k = a ;` with a = pi^k(s) for a fixed random "
               "M-cycle pi, so the answer at `=` needs about k passes of a looped core.")


@dataclass
class Task:
    """Sizes, token ids and the permutation of the language.

    Token ids: symbols 0..M-1, counts k = 1..KMAX as `M + k - 1`, then `EQ`, `SEP` (`;`), `BOS`.

    Args:
        M: The number of symbols.
        KMAX: The largest count.
        seed: Draws the permutation (a single M-cycle).
    """

    M: int = 64
    KMAX: int = 32
    seed: int = 0
    pi: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pi:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(self.M, generator=g).tolist()   # the cycle order[0] -> order[1] -> ...
            pi = [0] * self.M
            for i, x in enumerate(order):
                pi[x] = order[(i + 1) % self.M]
            self.pi = pi
        self._powers = torch.empty(self.KMAX + 1, self.M, dtype=torch.long)   # _powers[k, s] = pi^k(s)
        self._powers[0] = torch.arange(self.M)
        p = torch.tensor(self.pi)
        for k in range(1, self.KMAX + 1):
            self._powers[k] = p[self._powers[k - 1]]

    # ---- token ids ----
    @property
    def EQ(self) -> int:
        return self.M + self.KMAX

    @property
    def SEP(self) -> int:
        return self.M + self.KMAX + 1

    @property
    def BOS(self) -> int:
        return self.M + self.KMAX + 2

    @property
    def vocab_size(self) -> int:
        return self.M + self.KMAX + 3

    def count(self, k: int) -> int:
        """The token id of count k."""
        return self.M + k - 1

    def answer(self, s: int, k: int) -> int:
        """pi^k(s)."""
        return int(self._powers[k, s])

    def sample_k(self, n: int, g: torch.Generator, kmax: Optional[int] = None, uniform: float = 0.0) -> torch.Tensor:
        """n counts from P(k) ~ 1/k on 1..kmax (mixed with a fraction `uniform` of uniform draws)."""
        kmax = kmax or self.KMAX
        w = 1.0 / torch.arange(1, kmax + 1, dtype=torch.float64)
        w = (1 - uniform) * w / w.sum() + uniform / kmax
        return torch.multinomial(w, n, replacement=True, generator=g) + 1

    def sequences(self, batch: int, queries: int = 6, seed: int = 0, kmax: Optional[int] = None,
                  uniform: float = 0.0, g: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training sequences: int64 `[batch, 1 + 5 * queries]`, BOS then `s k = a ;` repeated."""
        g = g or torch.Generator().manual_seed(seed)
        s = torch.randint(0, self.M, (batch, queries), generator=g)
        k = self.sample_k(batch * queries, g, kmax, uniform).view(batch, queries)
        a = self._powers[k, s]
        q = torch.stack((s, self.M + k - 1, torch.full_like(s, self.EQ), a, torch.full_like(s, self.SEP)), -1)
        return torch.cat((torch.full((batch, 1), self.BOS), q.view(batch, -1)), 1)

    def prompts(self, n: int, seed: int = 1, queries: int = 2, ks: Optional[Sequence[int]] = None
                ) -> Tuple[List[List[int]], List[int]]:
        """Prompts for generation: BOS, `queries` complete queries, then `s k` (k uniform on 1..KMAX,
        or the given ks). Returns (prompts, the final k of each)."""
        g = torch.Generator().manual_seed(seed)
        seqs = self.sequences(n, queries + 1, g=g)
        ks = list(ks) if ks is not None else (torch.randint(1, self.KMAX + 1, (n,), generator=g)).tolist()
        out = []
        for row, k in zip(seqs.tolist(), ks):
            p = row[:1 + 5 * queries + 1]
            out.append(p + [self.count(k)])
        return out, ks

    def mixed_prompts(self, n: int, seed: int = 1) -> List[List[int]]:
        """Prompts as a server meets them: BOS, 1 to 3 complete queries, then the next query cut
        after 0 to 4 of its 5 tokens, so decoding reaches its hard `=` tokens at different
        steps; counts from the language's P(k) ~ 1/k."""
        g = torch.Generator().manual_seed(seed)
        seqs = self.sequences(n, 4, g=g)
        q = torch.randint(1, 4, (n,), generator=g).tolist()
        cut = torch.randint(0, 5, (n,), generator=g).tolist()
        return [row[:1 + 5 * qi + ci] for row, qi, ci in zip(seqs.tolist(), q, cut)]

    def decode(self, tokens: Sequence[int]) -> str:
        """Readable text: symbols as `x12`, counts as their number."""
        words = []
        for t in tokens:
            if t < self.M:
                words.append(f"x{t}")
            elif t < self.EQ:
                words.append(str(t - self.M + 1))
            else:
                words.append({self.EQ: "=", self.SEP: ";", self.BOS: "<s>"}.get(t, "?"))
        return " ".join(words)


def judge(task: Task, prompt: Sequence[int], generated: Sequence[int]) -> List[Tuple[int, int, bool]]:
    """Every generated answer: (its index in `generated`, k, correct).

    An answer is a generated token right after `=` preceded by `s k` (whoever wrote them); it is
    correct when it equals pi^k(s).
    """
    full = list(prompt) + list(generated)
    P, out = len(prompt), []
    for j in range(len(generated)):
        i = P + j
        if i < 3 or full[i - 1] != task.EQ:
            continue
        s, c = full[i - 3], full[i - 2]
        if s < task.M and task.M <= c < task.EQ:
            k = c - task.M + 1
            out.append((j, k, full[i] == task.answer(s, k)))
    return out


__all__ = ["Task", "judge", "DESCRIPTION"]
