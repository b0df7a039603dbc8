"""Recomputation replays the forward's map: checkpointed passes (`Unroll(checkpoint=c)`) see
the parametrization cache and the `SharedDropout` masks that the forward used.

`SharedDropout` reports the mask it uses to the innermost recording context and, during a
recomputation, takes the mask noted then (`RECORDING`, `REPLAYING`: stacks of dicts).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch.nn.utils import parametrize

#: the masks noted by the checkpointed forwards running now (innermost last)
RECORDING: List[Dict[Any, Any]] = []
#: the masks to use while a recomputation runs (innermost last)
REPLAYING: List[Dict[Any, Any]] = []


def same_map() -> "tuple[_CacheNote, _CacheReplay]":
    """Checkpoint contexts (`torch.utils.checkpoint`'s `context_fn`) that replay f as it ran.

    Two things can make the recomputation another map. `DEQ` computes parametrized weights
    (spectral_norm, ...) once per forward under `parametrize.cached()`; backward runs after
    that context is closed, so the recomputation would compute them again (and a power
    iteration would move on). And a `SharedDropout` draws a new mask at each DEQ forward: a
    second forward before backward would give the recomputation the newer mask. The forward
    context notes the cache and the masks used; every recomputation runs with them.
    """
    note = _CacheNote()
    return note, _CacheReplay(note)


class _CacheNote:
    """Forward context: notes torch's parametrization cache, if it is on (the module globals
    `_cache_enabled` and `_cache` of torch.nn.utils.parametrize, read defensively: private)."""

    cache: Optional[dict] = None

    def __init__(self) -> None:
        self.masks: Dict[Any, Any] = {}   # SharedDropout module -> the mask it used here

    def __enter__(self) -> None:
        if getattr(parametrize, "_cache_enabled", 0) and isinstance(getattr(parametrize, "_cache", None), dict):
            self.cache = dict(parametrize._cache)
        RECORDING.append(self.masks)

    def __exit__(self, *exc: Any) -> None:
        _drop(RECORDING, self.masks)


class _CacheReplay:
    """Recomputation context (entered once per backward): the noted cache, switched on."""

    def __init__(self, note: _CacheNote) -> None:
        self.note, self.before = note, None

    def __enter__(self) -> None:
        if self.note.cache is not None:
            self.before = parametrize._cache_enabled, parametrize._cache
            parametrize._cache_enabled, parametrize._cache = self.before[0] + 1, dict(self.note.cache)
        REPLAYING.append(self.note.masks)

    def __exit__(self, *exc: Any) -> None:
        _drop(REPLAYING, self.note.masks)
        if self.before is not None:
            parametrize._cache_enabled, parametrize._cache = self.before
            self.before = None


def _drop(stack: List[Dict[Any, Any]], entry: Dict[Any, Any]) -> None:
    """Remove `entry` itself (by identity, not by equal contents) from a stack."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is entry:
            del stack[i]
            return


__all__ = ["same_map", "RECORDING", "REPLAYING"]
