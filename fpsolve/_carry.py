"""`fpsolve.Carry`: deep supervision of a looped model (HRM/TRM) as slots that persist across steps.

`slots` rows are in flight. Each call of `Carry.step(x, targets)` runs ONE segment (a `solve`
with the options given to `Carry`) on all slots at a fixed shape and returns its state with
the segment's gradient; the state kept for the next step is detached. A slot is refilled at
the next step when its sample halted: its segment ended with a status in `halt_on` (by
default CONVERGED: the residual rule held, i.e. the fixed point was reached), its segment
count reached `max_segments`, or the user marked it with `CarryStep.halt` (a learned halt,
e.g. HRM/TRM's Q-head). A refilled slot i takes row i of the incoming batch (the rows of the
other slots are not used, as in HRM/TRM), its state starts again from `z0` and its segment
count from 1.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ._checks import as_int
from ._options import SOLVE_DEFAULTS, Options
from ._solution import Solution, Status
from ._solve import solve_with
from ._tree import align, leaves, map_tensors, rebuild, tensors_in


def _rows(x: Any) -> Optional[int]:
    """The batch size shared by every tensor of x (None: no tensor); a clear error otherwise."""
    sizes = {t.shape[0] if t.ndim else -1 for t in tensors_in(x)}
    if not sizes:
        return None
    if len(sizes) > 1 or -1 in sizes:
        raise ValueError(f"the tensors of one input must share their batch size (the first dimension); "
                         f"got sizes {sorted(sizes)}.")
    return sizes.pop()


def _where(mask: Tensor, new: Any, old: Any) -> Any:
    """Per row: `new` where mask, else `old` (two structures alike; non-tensor leaves from new)."""
    olds = iter(leaves(old))

    def pick(a: Any) -> Any:
        b = next(olds)
        if not isinstance(a, Tensor):
            return a
        return torch.where(mask.view((-1,) + (1,) * (a.ndim - 1)), a, b)

    return rebuild(new, iter([pick(a) for a in leaves(new)]))


def _same_rows(name: str, template: Any, x: Any) -> Any:
    """x aligned to the first batch's structure, with rows of the same shape and dtype."""
    x = align(template, x, name)
    for i, (a, b) in enumerate(zip(tensors_in(template), tensors_in(x))):
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"{name}: tensor {i} has rows of shape {tuple(b.shape[1:])}, {b.dtype}, on {b.device}; "
                             f"the first batch had {tuple(a.shape[1:])}, {a.dtype}, on {a.device}: every batch "
                             f"must have rows alike.")
    return x


class CarryStep:
    """What one `Carry.step` returns: the segment's state (with its gradient) and the slots' bookkeeping.

    Every per-slot tensor is in slot order, `[slots, ...]`. Made by `Carry.step`, not by users.

    Attributes:
        z: The state after the segment, with the gradient the segment's `backward` gives
            (the carry keeps a detached copy).
        solution: The segment's `Solution` (iterations, residual, status per slot).
        x: The inputs of the samples in the slots, as f saw them.
        targets: The targets of the samples in the slots (None when none were given).
        index: int64 `[slots]`: each slot's sample, as its position in the stream of incoming
            rows (row i of the t-th batch, counting from 0, is `t * slots + i`).
        segment: int64 `[slots]`: which segment of its sample this step ran (1: the first).
        refilled: bool `[slots]`: the slots that took a new sample at this step (segment == 1).
        last: bool `[slots]`: the slots whose sample has now had `max_segments` segments.
        halted: bool `[slots]`: the slots that will be refilled at the next step, as decided
            so far (budget, `halt_on`, and the marks of `halt`).

    Example:
        ```python
        carry = fpsolve.Carry(lambda z, x: 0.5 * z + x, slots=2, max_segments=2,
                              criterion=fpsolve.Depth(1), backward="none")
        step = carry.step(torch.ones(2, 1))
        print(step.segment.tolist(), step.refilled.tolist(), step.index.tolist())  # [1, 1] [True, True] [0, 1]
        ```
    """

    def __init__(self, z: Any, solution: Solution, x: Any, targets: Any, index: Tensor, segment: Tensor,
                 refilled: Tensor, last: Tensor) -> None:
        self._carry: Any = None   # the carry that made it (set by Carry.step)
        self._number = 0
        self._halted_then: Optional[Tensor] = None   # set when the carry moves on
        self.z, self.solution, self.x, self.targets = z, solution, x, targets
        self.index, self.segment, self.refilled, self.last = index, segment, refilled, last

    @property
    def halted(self) -> Tensor:
        """bool `[slots]`: the slots that the next step refills, as decided so far.

        Returns:
            A copy of the carry's flags (marking more slots goes through `halt`).
        """
        return self._carry.halted if self._halted_then is None else self._halted_then.clone()

    def halt(self, mask: Any) -> Tensor:
        """Mark slots as halted: the next step gives them a new sample (a learned, ACT-style halt).

        Marks add to the halts already decided (budget, `halt_on`); they cannot undo them.
        Only the newest step may be marked: the carry has moved on after the next `step`.

        Args:
            mask: bool `[slots]` (a tensor or a list of bools): True halts that slot.

        Returns:
            bool `[slots]`: every slot the next step refills.

        Raises:
            RuntimeError: the step is not the carry's newest one.
            ValueError: a mask of another shape than `[slots]`.

        Example:
            ```python
            carry = fpsolve.Carry(lambda z, x: z + x, slots=3, criterion=fpsolve.Depth(2), backward="none")
            step = carry.step(torch.ones(3, 1))
            print(step.halt(torch.tensor([False, True, False])).tolist())   # [False, True, False]
            print(carry.step(torch.full((3, 1), 5.0)).x.flatten().tolist())  # [1.0, 5.0, 1.0]
            ```
        """
        if self._halted_then is not None:
            raise RuntimeError(f"CarryStep.halt: this is step {self._number}, but the carry has run step "
                               f"{self._carry.steps} since; mark halts on the newest step, before the next "
                               f"carry.step(...).")
        return self._carry._mark(mask)

    def __repr__(self) -> str:
        return (f"CarryStep(step={self._number}, segment={self.segment.tolist()}, refilled={self.refilled.tolist()}, "
                f"halted={self.halted.tolist()})")


class Carry:
    """Deep supervision (HRM/TRM): `slots` samples in flight, one segment per optimizer step, halted slots refilled.

    Each `step(x, targets)` refills the halted slots from the incoming batch (slot i takes
    row i; the batch must have exactly `slots` rows), then runs one segment: a
    `fpsolve.solve(f, z, x_slots, **solve_options)` from the carried state, whose `z` has the
    gradient of the segment's `backward` (e.g. `criterion=fpsolve.Depth(K)` with
    `backward=fpsolve.Unroll(steps=1)`: K passes, the gradient of the last). The state kept
    for the next step is detached. A slot halts, and is refilled at the next step, when its
    segment's status is in `halt_on` (default: CONVERGED, the residual rule, so that a model
    without a halt head gets adaptive compute from its fixed point), when its sample has had
    `max_segments` segments, or when the user marks it with `CarryStep.halt` (a learned halt
    such as HRM/TRM's Q-head). Before the first step every slot is halted. The inputs and
    targets are carried detached too: an input with a gradient (an embedding's output) gets
    it at the step its row came in; embed inside f, as HRM/TRM do, to train the embedding
    at every segment.

    Args:
        f: The map `f(z, x) -> ` the next state (a tensor or tuple of tensors `[slots, ...]`).
        slots: The samples in flight (an integer >= 1); every batch has exactly this many rows.
        z0: The start of a new sample's state: a callable `z0(x) -> ` state `[slots, ...]`
            (called with the slots' inputs; only the refilled rows are used), a state with
            1 row (used for every sample) or `slots` rows (row i for slot i), or None: zeros
            shaped like x (x must then be one floating tensor).
        max_segments: The most segments a sample receives (an integer >= 1), or None (no
            budget: slots then halt only by `halt_on` or `CarryStep.halt`).
        halt_on: The segment statuses that halt a slot (default: `(Status.CONVERGED,)`);
            e.g. add `Status.HALTED` when the segment's criterion is a halt head.
        **solve_options: Options of `fpsolve.solve` for every segment (`criterion`,
            `backward`, `solver`, `max_iter`, `rtol`, `min_iter`, ...).

    Raises:
        TypeError: f not callable, an unknown solve option, `z0` neither callable, a state,
            nor None.
        ValueError: `slots` or `max_segments` < 1, a bad solve option (see `solve`).

    Example:
        ```python
        W = torch.nn.Linear(4, 4).double()
        f = lambda z, x: torch.tanh(W(z) + x)
        carry = fpsolve.Carry(f, slots=8, max_segments=3,
                              criterion=fpsolve.Depth(4), backward=fpsolve.Unroll(steps=1))
        opt = torch.optim.SGD(W.parameters(), lr=0.1)
        for t in range(5):
            x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
            step = carry.step(x, targets=y)            # refill halted slots, run one segment
            loss = (step.z - step.targets).pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
        print(step.segment.tolist())   # every slot's sample is at its 2nd of 3 segments
        ```
    """

    def __init__(self, f: Callable[..., Any], *, slots: int, z0: Any = None, max_segments: Optional[int] = 16,
                 halt_on: Iterable[Any] = (Status.CONVERGED,), **solve_options: Any) -> None:
        if not callable(f):
            raise TypeError(f"Carry: f must be callable as f(z, x); got {type(f).__name__}.")
        self.f = f
        self.slots = as_int("Carry(slots=...)", slots)
        self.max_segments = None if max_segments is None else as_int("Carry(max_segments=...)", max_segments)
        self.halt_on = tuple(Status(int(s)) for s in halt_on)
        if z0 is not None and not callable(z0) and not tensors_in(z0):
            raise TypeError(f"Carry(z0=...) must be None, a callable z0(x) -> state, or a state (a tensor or a "
                            f"tuple of tensors with 1 or slots rows); got {type(z0).__name__}.")
        if not callable(z0) and z0 is not None:
            n = _rows(z0)
            if n not in (1, self.slots):
                raise ValueError(f"Carry(z0=...): a state z0 must have 1 row or slots = {self.slots} rows; got {n}.")
        self.z0 = z0
        self.options = Options.make("Carry", SOLVE_DEFAULTS, solve_options)
        self.steps = 0
        self.reset()

    def reset(self) -> None:
        """Halt every slot: the next step fills all of them with new samples (e.g. before evaluating).

        Returns:
            None.

        Example:
            ```python
            carry = fpsolve.Carry(lambda z, x: z + x, slots=2, criterion=fpsolve.Depth(1), backward="none")
            carry.step(torch.ones(2, 1)); carry.reset()
            print(carry.step(torch.ones(2, 1)).refilled.tolist())   # [True, True]
            ```
        """
        if getattr(self, "_newest", None) is not None:
            self._newest._halted_then = torch.ones(self.slots, dtype=torch.bool)
        self._z: Any = None        # the detached state of the slots
        self._x: Any = None        # the inputs of the samples in the slots
        self._y: Any = None        # their targets
        self._index = torch.zeros(self.slots, dtype=torch.int64)
        self._segment = torch.zeros(self.slots, dtype=torch.int64)
        self._halted = torch.ones(self.slots, dtype=torch.bool)
        self._template: Any = None
        self._targets_template: Any = None
        self._batches = 0
        self._newest: Optional[CarryStep] = None

    @property
    def halted(self) -> Tensor:
        """bool `[slots]`: the slots the next step refills (all of them before the first step).

        Returns:
            A copy of the flags.
        """
        return self._halted.clone()

    @property
    def state(self) -> Any:
        """The slots' carried state, detached (None before the first step).

        Returns:
            A state `[slots, ...]` in f's structure, or None.
        """
        return self._z

    def _mark(self, mask: Any) -> Tensor:
        m = torch.as_tensor(mask)
        if m.shape != (self.slots,):
            raise ValueError(f"Carry: a halt mask must be one bool per slot, shape ({self.slots},); "
                             f"got shape {tuple(m.shape)}.")
        if m.dtype != torch.bool:
            if m.is_floating_point():
                raise TypeError(f"Carry: a halt mask must be bool (e.g. q_halt > q_continue); got {m.dtype}.")
            m = m != 0
        self._halted = self._halted | m.detach().to(self._halted.device)
        return self._halted.clone()

    def _start(self, x: Any) -> Any:
        """The state a new sample starts from, for every slot (only refilled rows are used)."""
        if self.z0 is None:
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError("Carry(z0=None) starts from zeros shaped like x, so x must be one floating tensor; "
                                "pass z0 (a callable z0(x) -> state, or a state row).")
            return torch.zeros_like(x)
        if callable(self.z0):
            with torch.no_grad():
                out = self.z0(x)
            if _rows(out) != self.slots:
                raise ValueError(f"Carry: z0(x) must return a state with slots = {self.slots} rows; "
                                 f"got {_rows(out)}.")
            return map_tensors(torch.Tensor.detach, out)
        return map_tensors(lambda t: t.detach().expand((self.slots,) + tuple(t.shape[1:])), self.z0)

    def step(self, x: Any, targets: Any = None) -> CarryStep:
        """Refill the halted slots from this batch (slot i takes row i), then run one segment with gradients.

        Args:
            x: The incoming batch: a tensor or a tuple/list/dict of tensors with exactly
                `slots` rows (rows of slots that are not halted are not used).
            targets: None, or the batch's targets (any batch-first structure with `slots`
                rows); the step returns those of the samples in the slots.

        Returns:
            A `CarryStep`: `z` (with the segment's gradient), `solution`, `x`, `targets`,
            `index`, `segment`, `refilled`, `last`, `halted`, and `halt(mask)`.

        Raises:
            ValueError: a batch whose size is not `slots`, targets of another batch size than
                x, rows of another shape or structure than the first batch's.
        """
        n = _rows(x)
        if n is None:
            raise TypeError(f"Carry.step: x must be a tensor or a tuple/list/dict of tensors; got {type(x).__name__}.")
        if n != self.slots:
            raise ValueError(f"Carry.step: the batch has {n} rows, but the carry has slots = {self.slots}: every batch "
                             f"must have exactly {self.slots} rows (a refilled slot i takes row i). Drop a short "
                             f"last batch (DataLoader(drop_last=True)) or build the carry with slots = the batch size.")
        if targets is not None:
            m = _rows(targets)
            if m is not None and m != n:
                raise ValueError(f"Carry.step: targets have {m} rows but x has {n}: they must be the same batch.")
        if self._template is None:
            self._template, self._targets_template = x, targets
        else:
            x = _same_rows("Carry.step: x", self._template, x)
            if (targets is None) != (self._targets_template is None):
                raise ValueError("Carry.step: targets were given at one step and not at another; give them at "
                                 "every step or never.")
            if targets is not None:
                targets = _same_rows("Carry.step: targets", self._targets_template, targets)

        dev = tensors_in(x)[0].device
        if self._newest is not None:   # (the previous step's halts are final now)
            self._newest._halted_then = self._halted.clone()
        self._index, self._segment = self._index.to(dev), self._segment.to(dev)
        fresh = self._halted.to(dev)
        rows = torch.arange(self.slots, device=dev)
        self._x = x if self._x is None else _where(fresh, x, self._x)
        if targets is not None:
            self._y = targets if self._y is None else _where(fresh, targets, self._y)
        start = self._start(self._x)
        z = start if self._z is None else _where(fresh, start, self._z)
        self._index = torch.where(fresh, self._batches * self.slots + rows, self._index)
        self._segment = torch.where(fresh, torch.zeros_like(self._segment), self._segment) + 1
        self._batches += 1

        sol = solve_with(self.f, z, self._x, self.options)
        self._z = map_tensors(torch.Tensor.detach, sol.z)
        status = sol.status
        halted = torch.zeros(self.slots, dtype=torch.bool, device=dev)
        for s in self.halt_on:
            halted |= status == int(s)
        last = self._segment >= self.max_segments if self.max_segments is not None else torch.zeros_like(halted)
        self._halted = halted | last
        self.steps += 1
        out = CarryStep(sol.z, sol, self._x, self._y, self._index.clone(), self._segment.clone(), fresh.clone(), last)
        out._carry, out._number, self._newest = self, self.steps, out
        # (what is carried is detached: the graph of this step is freed by its backward)
        self._x, self._y = map_tensors(torch.Tensor.detach, self._x), map_tensors(torch.Tensor.detach, self._y)
        return out

    def __repr__(self) -> str:
        return (f"Carry(slots={self.slots}, max_segments={self.max_segments}, "
                f"halt_on={[s.name for s in self.halt_on]}, {self.options.describe()})")


__all__ = ["Carry", "CarryStep"]
