"""Leave f as it was found: the state of every module f can reach is saved before the
diagnosis and restored after it (buffers, training flags, SharedDropout masks)."""
from __future__ import annotations

import functools
import inspect
from typing import Any, List

import torch
from torch import Tensor, nn


def modules_of(f: Any, depth: int = 3) -> List[nn.Module]:
    """The nn.Modules that f can reach: f itself, a bound method's object, a partial's parts,
    closure cells, globals that f names, and attributes of plain objects (a few levels deep)."""
    found: List[nn.Module] = []
    seen: set = set()

    def visit(o: Any, d: int) -> None:
        if id(o) in seen or d < 0 or isinstance(o, (Tensor, type, str, bytes, int, float)) or inspect.ismodule(o):
            return
        seen.add(id(o))
        if isinstance(o, nn.Module):
            found.append(o)
        elif inspect.ismethod(o):
            visit(o.__self__, d - 1)
            visit(o.__func__, d - 1)
        elif isinstance(o, functools.partial):
            for v in (o.func, *o.args, *o.keywords.values()):
                visit(v, d - 1)
        elif inspect.isfunction(o):
            for cell in o.__closure__ or ():
                try:
                    visit(cell.cell_contents, d - 1)
                except ValueError:   # an empty cell
                    pass
            for name in o.__code__.co_names:
                if name in o.__globals__:
                    visit(o.__globals__[name], d - 1)
        elif isinstance(o, (list, tuple, set, dict)) and len(o) <= 256:   # (not a data set)
            for v in (o.values() if isinstance(o, dict) else o):
                visit(v, d - 1)
        elif hasattr(o, "__dict__"):
            for v in vars(o).values():
                visit(v, d - 1)

    visit(f, depth)
    return found


class KeepState:
    """Snapshot the buffers (BatchNorm running statistics, spectral_norm's vectors, ...),
    training flags and SharedDropout masks of the modules f can reach; restore them on exit,
    so that diagnosing a map leaves it as it was found."""

    def __init__(self, f: Any) -> None:
        self.saved = []
        for top in modules_of(f):
            for m in top.modules():
                buffers = {k: (b, b.detach().clone()) for k, b in m._buffers.items() if b is not None}
                self.saved.append((m, m.training, buffers, m.__dict__.get("mask")))

    def __enter__(self) -> "KeepState":
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for m, training, buffers, mask in self.saved:
                m.training = training
                for name, (buf, value) in buffers.items():
                    m._buffers[name] = buf
                    buf.copy_(value)
                if "mask" in m.__dict__:
                    m.__dict__["mask"] = mask


__all__ = ["KeepState", "modules_of"]
