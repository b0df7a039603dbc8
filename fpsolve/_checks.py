"""Argument checks shared by `solve`, the backward objects, `DEQ` and the blocks.

Each check names the argument, the value given and what would work, and returns the value
as the plain Python number it stands for, so numpy scalars (`np.int64(20)`, `np.float32(1e-4)`)
and 0-dim integer/float tensors are accepted as the numbers they are.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional

import torch
from torch import Tensor


class ArgumentError(TypeError, ValueError):
    """A count of the wrong kind (a float, a bool, a string): both a TypeError and a
    ValueError, so code written against either of fpsolve's older answers still catches it."""


def _kind(value: Any) -> str:
    return type(value).__name__


def as_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """`value` as an int >= minimum; bools, floats (even 10.0) and strings are rejected."""
    if isinstance(value, (bool, float)) or not isinstance(value, (numbers.Integral, Tensor)):
        raise ArgumentError(f"{name} must be an integer >= {minimum}; got {value!r} ({_kind(value)}).")
    if isinstance(value, Tensor) and (value.dtype == torch.bool or value.is_floating_point()):
        raise ArgumentError(f"{name} must be an integer >= {minimum}; got a {value.dtype} tensor.")
    try:
        number = operator.index(value)
    except TypeError as err:
        raise ArgumentError(f"{name} must be an integer >= {minimum}; got {value!r}.") from err
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {number}.")
    return number


def as_float(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
             at_most: Optional[float] = None) -> float:
    """`value` as a finite float >= minimum (> minimum when strict, <= at_most if given)."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r} ({_kind(value)}).")
    number = float(value)
    low = f"> {minimum:g}" if strict else f">= {minimum:g}"
    want = f"a finite number {low}" + (f" and <= {at_most:g}" if at_most is not None else "")
    if not math.isfinite(number) or number < minimum or (strict and number == minimum) or (
            at_most is not None and number > at_most):
        raise ValueError(f"{name} must be {want}; got {value!r}.")
    return number


def as_tolerances(atol: Any, rtol: Any, names: "tuple[str, str]" = ("atol", "rtol")) -> "tuple[float, float]":
    """(atol, rtol) as finite floats >= 0, not both 0 (no sample could ever halt)."""
    a = as_float(names[0], atol)
    r = as_float(names[1], rtol)
    if a == 0.0 and r == 0.0:
        raise ValueError(f"{names[0]} and {names[1]} are both 0: no sample could ever halt; "
                         f"set rtol (e.g. 1e-4) or atol.")
    return a, r


def as_bool(name: str, value: Any) -> bool:
    """`value` as a bool: True/False (or numpy's bool_), never a string such as "yes"."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {value!r} ({_kind(value)}).")


def usable_start(z0: Any) -> Any:
    """z0 (a tensor or a tuple/list of tensors) usable in a forward that autograd records.

    A tensor made under `torch.inference_mode()` (e.g. a cached warm start) cannot be saved
    for backward; outside inference mode it is cloned into an ordinary tensor (same values).
    Everything else is returned as it is, without a copy.
    """
    if torch.is_inference_mode_enabled():
        return z0
    if isinstance(z0, Tensor):
        return z0.clone() if z0.is_inference() else z0
    if isinstance(z0, (tuple, list)) and any(isinstance(t, Tensor) and t.is_inference() for t in z0):
        return type(z0)(t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in z0)
    return z0


def check_transforms(backward: Any) -> None:
    """A clear error for torch.func transforms that fpsolve cannot run under (call it first).

    vmap: solve is batched over dimension 0 already and decides halting on the host, so it
    cannot be vmapped. torch.func.grad & co. through Implicit: its adjoint runs torch.autograd
    on a kept graph, which functorch forbids. Both errors say what to use instead.
    """
    if not torch._C._are_functorch_transforms_active():
        return
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType

    kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    if TransformType.Vmap in kinds:
        raise RuntimeError(
            "torch.func.vmap over fpsolve.solve is not supported: solve is already batched "
            "over dimension 0, with per-sample halting and status. Stack the problems along "
            "dimension 0 and make one call (x of shape [B, ...], z0 of shape [B, ...]) instead."
        )
    if backward == "implicit" or getattr(backward, "autograd_in_backward", False):
        raise RuntimeError(
            "torch.func.grad (or vjp/jacrev) through backward='implicit' is not supported: the "
            "implicit adjoint runs torch.autograd on a kept graph. Use torch.autograd.grad or "
            "loss.backward() (ordinary autograd gives the implicit gradient), or, inside "
            "torch.func transforms, backward='unroll' or fpsolve.Phantom(...)."
        )
