"""`LoopedLM`: a small recurrent-depth causal language model whose core block is a fixed-point map.

A prelude embeds the tokens into e; a core block, looped with input injection of e, maps the
state h of every position to a new state; a coda reads logits out of the state. The forward
over whole sequences solves the core's state of all positions as one DEQ with `fpsolve.solve`
(any solver, criterion, backward mode). Decoding (`fpsolve.generate`) solves one token at a
time against a cache of the converged keys and values of the earlier tokens: token t's state
depends only on earlier tokens, so the joint fixed point is triangular and token-by-token
solving is forward substitution on it.

The protocol a user's own looped LM implements to use `generate` (`LoopedLM` is one):

- `prelude(tokens, positions) -> e`: `[B, T]` ids and positions to `[B, T, d]`;
- `core(h, e, cache=None) -> h`: one pass for the positions of h (`[B, T, d]`), attending
  causally to themselves and to `cache` (a `KVCache` of earlier positions, or None);
- `keys_values(h, e, cache=None) -> list of (k, v)`: per core layer, the keys and values of
  these positions at state h (what the cache keeps once h has converged);
- `coda(h) -> logits`: `[B, T, vocab]`; and the attributes `vocab_size`, `max_len`, `width`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import as_float, as_int
from ._solve import solve


@dataclass
class KVCache:
    """The converged keys and values of earlier positions, as `generate` hands them to `core`.

    Per core layer a pair `[B, H, S, dh]`, and per row how many of the S positions are real
    (the rest is padding that `mask` hides). A model's `core(h, e, cache)` attends to them
    beside its own positions. A cache is not changed while in use (its mask is made once).

    Args:
        layers: One `(keys, values)` pair per core layer, each `[B, H, S, dh]`.
        lengths: int64 `[B]`: the real cached positions of each row (the first `lengths[b]`).

    Example:
        ```python
        k = torch.randn(2, 1, 4, 8)
        cache = fpsolve.KVCache([(k, k)], torch.tensor([1, 3]))
        print(cache.mask(1)[:, 0, 0].tolist())   # row 0 sees 1 cached position, row 1 sees 3
        ```
    """

    layers: List[Tuple[Tensor, Tensor]]
    lengths: Tensor
    _masks: Dict[int, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)   # (made once per `new`)

    def mask(self, new: int) -> Tensor:
        """Which cached positions each row may attend to, for `new` new positions.

        Args:
            new: The number of new positions (the query length).

        Returns:
            bool `[B, 1, new, S]`, True where attention is allowed.

        Example:
            ```python
            cache = fpsolve.KVCache([(torch.zeros(1, 1, 3, 2),) * 2], torch.tensor([2]))
            print(cache.mask(2).shape)   # torch.Size([1, 1, 2, 3])
            ```
        """
        if new not in self._masks:   # (a cache is not changed while in use: its mask is made once)
            S = self.layers[0][0].shape[2]
            ok = torch.arange(S, device=self.lengths.device)[None, :] < self.lengths[:, None]
            self._masks[new] = ok[:, None, None, :].expand(-1, 1, new, S)
        return self._masks[new]


class _Attention(nn.Module):
    """Causal multi-head self-attention that can also attend to cached keys and values."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def project(self, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        B, T, _ = u.shape
        q, k, v = self.qkv(u).view(B, T, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, u: Tensor, past: Optional[Tuple[Tensor, Tensor]], past_mask: Optional[Tensor]) -> Tensor:
        B, T, d = u.shape
        q, k, v = self.project(u)
        causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()[None, None].expand(B, 1, T, T)
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
            causal = torch.cat((past_mask, causal), 3)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class _Layer(nn.Module):
    """A pre-norm transformer layer with small learned residual scales (for convergence)."""

    def __init__(self, d: int, heads: int, scale: float, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))
        self.a = nn.Parameter(torch.tensor(scale))
        self.m = nn.Parameter(torch.tensor(scale))

    def forward(self, u: Tensor, past: Optional[Tuple[Tensor, Tensor]] = None,
                past_mask: Optional[Tensor] = None) -> Tensor:
        u = u + self.a * self.attn(self.n1(u), past, past_mask)
        return u + self.m * self.mlp(self.n2(u))


class LoopedLM(nn.Module):
    """A small recurrent-depth causal LM: prelude, a looped core with input injection, coda.

    The core pass is h -> RMSNorm(layers(h + e)): the embedding e is injected at every pass,
    the layers are pre-norm with small learned residual scales, and the state is RMS-normalised
    (the ingredients that make looped blocks converge). `forward(tokens)` solves the core's
    state of all positions as one fixed point with `fpsolve.solve` and returns the logits and
    the `Solution`; `fpsolve.generate` decodes token by token with a cache of converged keys
    and values. Its methods are the protocol `generate` uses (module docstring of
    `fpsolve._looped_lm`).

    Args:
        vocab_size: The number of token ids.
        width: The state's width d.
        heads: Attention heads (must divide width).
        core_layers: Layers in the looped core.
        prelude_layers: Layers in the prelude (run once per token).
        max_len: The longest sequence (learned positions).
        residual_scale: The starting residual scale of the core's layers.
        mlp_ratio: The hidden width of the core layers' MLPs, in units of width (the prelude's
            layers keep 4).

    Raises:
        TypeError, ValueError: a size that is not a positive integer, or heads not dividing width.

    Example:
        ```python
        torch.manual_seed(0)
        lm = fpsolve.LoopedLM(vocab_size=11, width=32, heads=4).eval()
        tokens = torch.randint(0, 11, (2, 7))
        with torch.no_grad():
            logits, sol = lm(tokens, rtol=1e-6)
        print(logits.shape, sol.converged.all().item())   # torch.Size([2, 7, 11]) True
        ```
    """

    def __init__(self, vocab_size: int, width: int = 64, heads: int = 4, core_layers: int = 1,
                 prelude_layers: int = 1, max_len: int = 256, residual_scale: float = 0.2,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        self.vocab_size = as_int("vocab_size", vocab_size, minimum=2)
        self.width = d = as_int("width", width)
        heads = as_int("heads", heads)
        if d % heads:
            raise ValueError(f"heads={heads} must divide width={d}.")
        self.max_len = as_int("max_len", max_len)
        scale = as_float("residual_scale", residual_scale, strict=True)
        self.embed = nn.Embedding(self.vocab_size, d)
        self.pos = nn.Embedding(self.max_len, d)
        self.pre = nn.ModuleList(_Layer(d, heads, 1.0) for _ in range(as_int("prelude_layers", prelude_layers, minimum=0)))
        ratio = as_int("mlp_ratio", mlp_ratio)
        self.core_layers = nn.ModuleList(_Layer(d, heads, scale, ratio) for _ in range(as_int("core_layers", core_layers)))
        self.head_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.vocab_size)

    # ---- the protocol -----------------------------------------------------------------------
    def prelude(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The injected embedding e `[B, T, d]` of tokens at positions.

        The prelude's layers see each token on its own: e of a token depends only on it and its
        position (so decoding needs no prelude cache).

        Args:
            tokens: int64 `[B, T]`.
            positions: int64 `[B, T]`.

        Returns:
            `[B, T, d]`.
        """
        e = self.embed(tokens) + self.pos(positions)
        B, T, d = e.shape
        for layer in self.pre:   # (each token on its own: a batch of B*T sequences of length 1)
            e = layer(e.reshape(B * T, 1, d)).view(B, T, d)
        return e

    def core(self, h: Tensor, e: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """One pass of the looped core for the positions of h, attending to `cache`.

        Args:
            h: The state `[B, T, d]`.
            e: The injected embedding, like h.
            cache: The converged keys and values of earlier positions, or None.

        Returns:
            The next state, RMS-normalised, like h.
        """
        u = h + e
        mask = None if cache is None else cache.mask(h.shape[1])
        for i, layer in enumerate(self.core_layers):
            u = layer(u, None if cache is None else cache.layers[i], mask)
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6)

    def keys_values(self, h: Tensor, e: Tensor, cache: Optional[KVCache] = None) -> List[Tuple[Tensor, Tensor]]:
        """Per core layer, the keys and values of these positions at state h (for the cache).

        Args:
            h: The (converged) state `[B, T, d]`.
            e: The injected embedding, like h.
            cache: The earlier positions' cache (deeper layers' inputs attend to it), or None.

        Returns:
            A list with one `(k, v)` pair `[B, H, T, dh]` per core layer.
        """
        u = h + e
        out: List[Tuple[Tensor, Tensor]] = []
        for i, layer in enumerate(self.core_layers):
            _, k, v = layer.attn.project(layer.n1(u))
            out.append((k, v))
            if i + 1 < len(self.core_layers):   # (the cache is read only to feed a deeper layer)
                u = layer(u, None if cache is None else cache.layers[i],
                          None if cache is None else cache.mask(h.shape[1]))
        return out

    def coda(self, h: Tensor) -> Tensor:
        """Logits `[B, T, vocab]` read out of the state.

        Args:
            h: The state `[B, T, d]`.

        Returns:
            `[B, T, vocab_size]`.
        """
        return self.head(self.head_norm(h))

    # ---- whole sequences ----------------------------------------------------------------------
    def forward(self, tokens: Tensor, **options: Any) -> Tuple[Tensor, Any]:
        """Solve the core's state of every position as one fixed point; return (logits, Solution).

        Args:
            tokens: int64 `[B, T]`, T <= max_len.
            **options: Keyword options of `fpsolve.solve` (solver, criterion, backward, rtol, ...).

        Returns:
            The logits `[B, T, vocab_size]` and the `Solution` of the core's solve.
        """
        check_tokens(tokens, self)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        e = self.prelude(tokens, positions)
        sol = solve(lambda h, e: self.core(h, e), torch.zeros_like(e), e, **options)
        return self.coda(sol.z), sol


def check_tokens(tokens: Any, model: Any, name: str = "tokens") -> None:
    """A clear error for ids that are not a batch of sequences the model can read."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor [B, T]; got {tokens!r:.60}.")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty: give at least one token.")
    if tokens.shape[1] > model.max_len:
        raise ValueError(f"{name} has {tokens.shape[1]} positions, more than the model's max_len={model.max_len}.")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {model.vocab_size}): "
                         f"{int(tokens.min())}..{int(tokens.max())}.")


__all__ = ["LoopedLM", "KVCache", "check_tokens"]
