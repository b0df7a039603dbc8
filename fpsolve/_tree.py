"""Batch structures: the one walker over users' nested states and inputs, and the state layout.

Users pass a tensor, or tuples, lists, namedtuples and dicts of tensors (nested). Every part
of fpsolve that looks inside such a structure goes through the functions here, so that a
dict is always matched by key (never by position) and a namedtuple is rebuilt by field.

The loop works on a single tensor `[B, ...]` (`StateLayout`): a single-tensor state is used
as it is (a `[B]` state becomes `[B, 1]`); a tuple/list state is flattened per sample and
concatenated to `[B, D]`. float16/bfloat16 states are solved in float32 and cast back for f
and the result.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def children(x: Any) -> Optional[List[Any]]:
    """The parts of a container (dict values in key order), or None for a leaf."""
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return list(x)
    return None


def remake(template: Any, parts: Sequence[Any]) -> Any:
    """A container like `template` holding `parts` (dict by its keys, namedtuple by field)."""
    if isinstance(template, dict):
        return type(template)(zip(template.keys(), parts))
    if _is_namedtuple(template):
        return type(template)(*parts)
    return type(template)(parts)


def leaves(x: Any) -> List[Any]:
    """Every leaf of a nested structure, depth first (dict values in key order)."""
    parts = children(x)
    if parts is None:
        return [x]
    return [leaf for p in parts for leaf in leaves(p)]


def tensors_in(x: Any) -> List[Tensor]:
    """All tensors in a (nested) structure."""
    return [t for t in leaves(x) if isinstance(t, Tensor)]


def rebuild(template: Any, items: Iterator[Any]) -> Any:
    """`template`'s structure with its leaves taken, in order, from `items`."""
    parts = children(template)
    if parts is None:
        return next(items)
    return remake(template, [rebuild(p, items) for p in parts])


def map_tensors(fn: Callable[[Tensor], Any], x: Any) -> Any:
    """x with every tensor t replaced by fn(t), keeping its structure (other leaves as they are)."""
    parts = children(x)
    if parts is None:
        return fn(x) if isinstance(x, Tensor) else x
    return remake(x, [map_tensors(fn, p) for p in parts])


def align(template: Any, x: Any, name: str = "x") -> Any:
    """x with every dict's keys in the order of the matching dict of `template` (matched by
    key, never by position); a clear error naming the keys when the structures differ."""
    if isinstance(template, dict):
        if not isinstance(x, dict) or set(x) != set(template):
            got = sorted(map(str, x)) if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"{name} has keys {got}, but the first batch had {sorted(map(str, template))}: "
                             f"every batch must have the same keys.")
        return {k: align(template[k], x[k], f"{name}[{k!r}]") for k in template}
    parts, want = children(x), children(template)
    if want is None or parts is None:
        if (want is None) != (parts is None):
            raise ValueError(f"{name} is a {type(x).__name__}, but the first batch had a {type(template).__name__} there.")
        return x
    if len(parts) != len(want):
        raise ValueError(f"{name} has {len(parts)} parts, but the first batch had {len(want)}.")
    return remake(x, [align(w, p, f"{name}[{i}]") for i, (w, p) in enumerate(zip(want, parts))])


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class ShapeError(ValueError):
    """f returned a state of another structure, shape, dtype or device than z0."""


class StateLayout:
    """How the user's state structure maps to the loop tensor and back."""

    def __init__(self, z0: Any) -> None:
        if isinstance(z0, Tensor):
            leaves: Sequence[Tensor] = (z0,)
            self.container: Optional[type] = None
        elif isinstance(z0, (tuple, list)) and len(z0) > 0:
            leaves = tuple(z0)
            self.container = type(z0)
            self.template = z0
        else:
            raise TypeError(
                f"z0 must be a tensor [B, ...] or a non-empty tuple/list of such tensors; "
                f"got {type(z0).__name__}."
            )
        first = leaves[0]
        for i, t in enumerate(leaves):
            name = "z0" if self.container is None else f"z0[{i}]"
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor; got {type(t).__name__}.")
            if t.ndim < 1:
                raise ValueError(f"{name} must be batch-first with at least one dimension; got a 0-dim tensor.")
            if not t.is_floating_point():
                raise TypeError(f"{name} must have a floating-point dtype; got {t.dtype}.")
            if t.shape[0] != first.shape[0]:
                raise ValueError(
                    f"{name} has batch size {t.shape[0]} but z0[0] has {first.shape[0]}: "
                    f"every state tensor must share dimension 0."
                )
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"{name} has dtype {t.dtype} on {t.device}, z0[0] has {first.dtype} on "
                    f"{first.device}: state tensors must share dtype and device."
                )
        self.batch = first.shape[0]
        self.dtype = first.dtype
        self.device = first.device
        self.work_dtype = torch.float32 if first.dtype in _LOW_PRECISION else first.dtype
        self.sample_shapes = [tuple(t.shape[1:]) for t in leaves]
        self.sizes = [math.prod(s) for s in self.sample_shapes]
        self.leaves = leaves

    # --- conversions -------------------------------------------------------------------
    def pack(self, z: Any) -> Tensor:
        """User structure -> loop tensor (work dtype)."""
        if self.container is None:
            t = z if z.ndim > 1 else z.unsqueeze(1)
        else:
            t = torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in z], dim=1)
        return t if t.dtype == self.work_dtype else t.to(self.work_dtype)

    def unpack(self, t: Tensor) -> Any:
        """Loop tensor -> user structure (user dtype)."""
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        if self.container is None:
            return t if len(self.sample_shapes[0]) else t.squeeze(1)
        b = t.shape[0]
        parts = torch.split(t, self.sizes, dim=1)
        return remake(self.template, [p.reshape(b, *s) for p, s in zip(parts, self.sample_shapes)])

    def is_identity(self) -> bool:
        """True when pack/unpack are no-ops (single tensor state, ndim > 1, work dtype)."""
        return (
            self.container is None
            and len(self.sample_shapes[0]) > 0
            and self.work_dtype == self.dtype
        )

    # --- checks ------------------------------------------------------------------------
    def check_output(self, out: Any) -> None:
        """Raise a clear error if f's output does not match z0's structure, shape, dtype, device."""
        if self.container is None:
            if not isinstance(out, Tensor):
                raise TypeError(f"f must return a tensor shaped like z0; it returned {type(out).__name__}.")
            outs: Sequence[Tensor] = (out,)
        else:
            if not isinstance(out, (tuple, list)) or len(out) != len(self.leaves):
                raise TypeError(
                    f"z0 is a {self.container.__name__} of {len(self.leaves)} tensors, so f must "
                    f"return the same; it returned {type(out).__name__}"
                    + (f" of length {len(out)}." if isinstance(out, (tuple, list)) else ".")
                )
            outs = tuple(out)
        for i, (o, ref) in enumerate(zip(outs, self.leaves)):
            name = "f(z, x)" if self.container is None else f"f(z, x)[{i}]"
            ref_name = "z0" if self.container is None else f"z0[{i}]"
            if not isinstance(o, Tensor):
                raise TypeError(f"{name} must be a tensor; got {type(o).__name__}.")
            if o.shape != ref.shape or o.dtype != ref.dtype or o.device != ref.device:
                raise ShapeError(
                    f"{name} returned {_describe(o)}, but {ref_name} has {_describe(ref)}: "
                    f"f must map a state to a state of the same shape, dtype and device."
                )

    def wrap(self, f: Callable[..., Any], has_x: bool) -> Callable[[Tensor, Any], Any]:
        """The function the loop calls: loop tensor (active rows) -> loop tensor."""
        if self.is_identity():
            return f if has_x else (lambda z, xa: f(z))
        pack, unpack, checked = self.pack, self.unpack, self._checked
        if has_x:
            return lambda z, xa: pack(checked(f(unpack(z), xa)))
        return lambda z, xa: pack(checked(f(unpack(z))))

    def _checked(self, out: Any) -> Any:
        """f's output at a later pass, after a cheap check of its structure and dtype."""
        if self.container is None:
            ok = isinstance(out, Tensor) and out.dtype == self.dtype
        else:
            ok = (isinstance(out, (tuple, list)) and len(out) == len(self.leaves)
                  and all(isinstance(o, Tensor) and o.dtype == self.dtype for o in out))
        if not ok:
            self.check_output(out)   # raises the clear error
        return out


def check_x(x: Any, batch: int, name: str = "x") -> None:
    """Every tensor in x (tensor, tuple, list or dict, nested) must be batch-first with size B."""
    if x is None:
        return
    if isinstance(x, Tensor):
        if x.ndim == 0 or x.shape[0] != batch:
            got = "a 0-dim tensor" if x.ndim == 0 else f"batch size {x.shape[0]} (shape {tuple(x.shape)})"
            raise ValueError(
                f"{name} has {got}, but z0 has batch size {batch}: inputs must be batch-first "
                f"with the same B (close over tensors that are shared by all samples)."
            )
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            check_x(v, batch, f"{name}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            check_x(v, batch, f"{name}[{k!r}]")
    else:
        raise TypeError(
            f"{name} must be None, a tensor, or a tuple/list/dict of batch-first tensors; "
            f"got {type(x).__name__}."
        )


def select_rows(x: Any, index: Tensor) -> Any:
    """The rows `index` of every tensor in x, keeping its structure."""
    return map_tensors(lambda t: t.index_select(0, index), x)
