"""`fpsolve.Carry` (issue 20, item 4): deep supervision with slots that persist across steps,
against hand-written carry loops on the same data, values and gradients in float64."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fpsolve
from fpsolve import Status

F64 = torch.float64
SLOTS = 4


def grads(loss, tensors):
    out = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors)]


def where(mask, new, old):
    return torch.where(mask.view((-1,) + (1,) * (new.ndim - 1)), new, old)


# ---- (a) Depth(K) with a last-pass gradient and a budget of segments ----------------------

def hand_depth_loop(f, batches, K, max_segments):
    """HRM/TRM's carry as a plain loop: K passes per segment, the last with autograd."""
    z = xs = ys = None
    seg = torch.zeros(SLOTS, dtype=torch.int64)
    index = torch.zeros(SLOTS, dtype=torch.int64)
    halted = torch.ones(SLOTS, dtype=torch.bool)
    for t, (xb, yb) in enumerate(batches):
        xs = xb if xs is None else where(halted, xb, xs)
        ys = yb if ys is None else where(halted, yb, ys)
        start = torch.zeros_like(xb).detach()
        z = start if z is None else where(halted, start, z)
        seg = torch.where(halted, 0, seg) + 1
        index = torch.where(halted, t * SLOTS + torch.arange(SLOTS), index)
        refilled = halted.clone()
        with torch.no_grad():
            for _ in range(K - 1):
                z = f(z, xs)
        z = f(z, xs)
        yield z, xs, ys, seg.clone(), index.clone(), refilled
        halted = seg >= max_segments
        z, xs = z.detach(), xs.detach()


def test_depth_with_a_last_pass_gradient_and_a_budget_equals_the_hand_loop():
    torch.manual_seed(0)
    W = (0.6 * torch.randn(3, 3, dtype=F64)).requires_grad_()
    f = lambda z, x: torch.tanh(z @ W + x)  # noqa: E731
    batches = [(torch.randn(SLOTS, 3, dtype=F64, requires_grad=True), torch.randn(SLOTS, 3, dtype=F64))
               for _ in range(7)]
    xs = [b[0] for b in batches]
    carry = fpsolve.Carry(f, slots=SLOTS, max_segments=3, criterion=fpsolve.Depth(4),
                          backward=fpsolve.Unroll(steps=1))
    for t, ((xb, yb), (z, x, y, seg, index, refilled)) in enumerate(
            zip(batches, hand_depth_loop(f, batches, K=4, max_segments=3))):
        step = carry.step(xb, targets=yb)
        assert torch.equal(step.z.detach(), z.detach()) and torch.equal(step.x.detach(), x.detach())
        assert torch.equal(step.targets, y)
        assert step.segment.tolist() == seg.tolist() and step.index.tolist() == index.tolist()
        assert step.refilled.tolist() == refilled.tolist() and step.last.tolist() == (seg >= 3).tolist()
        assert step.solution.iterations.tolist() == [4] * SLOTS
        assert carry.state is not None and not carry.state.requires_grad
        got = grads((step.z - step.targets).pow(2).sum(), [W, *xs[:t + 1]])
        want = grads((z - y).pow(2).sum(), [W, *xs[:t + 1]])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert step.segment.tolist() == [1] * SLOTS      # 7 steps of 3 segments: the third sample's first
    assert step.index.tolist() == [6 * SLOTS + i for i in range(SLOTS)]


# ---- (b) the residual rule: a slot whose segment converged is refilled --------------------

def test_fixed_point_halting_refills_converged_slots_as_the_hand_loop():
    """f(z) = a z + b per slot (a in x[:, 0]): small a converges inside one segment of 4 plain
    passes, a = 0.9 needs several segments (or the budget of 5)."""
    torch.manual_seed(1)
    scale = torch.tensor(1.0, dtype=F64, requires_grad=True)
    f = lambda z, x: x[:, :1] * z + scale * x[:, 1:]  # noqa: E731
    opts = dict(solver="fixed_point", max_iter=4, rtol=1e-3, backward=fpsolve.Unroll())

    def batch():
        a = torch.tensor([0.05, 0.3, 0.9, 0.95], dtype=F64)[torch.randperm(SLOTS)]
        return torch.stack([a, torch.randn(SLOTS, dtype=F64)], 1).requires_grad_(), torch.randn(SLOTS, 1, dtype=F64)

    batches = [batch() for _ in range(8)]
    carry = fpsolve.Carry(f, slots=SLOTS, z0=torch.zeros(1, 1, dtype=F64), max_segments=5, **opts)
    z = xs = ys = None
    seg = torch.zeros(SLOTS, dtype=torch.int64)
    halted = torch.ones(SLOTS, dtype=torch.bool)
    by_convergence = 0
    for t, (xb, yb) in enumerate(batches):
        step = carry.step(xb, targets=yb)
        xs = xb if xs is None else where(halted, xb, xs)
        ys = yb if ys is None else where(halted, yb, ys)
        z = torch.zeros(SLOTS, 1, dtype=F64) if z is None else where(halted, torch.zeros(SLOTS, 1, dtype=F64), z)
        seg = torch.where(halted, 0, seg) + 1
        sol = fpsolve.solve(f, z, xs, **opts)
        assert torch.equal(step.z.detach(), sol.z.detach()) and torch.equal(step.solution.status, sol.status)
        assert step.segment.tolist() == seg.tolist() and torch.equal(step.targets, ys)
        got = grads((step.z - step.targets).pow(2).sum(), [scale, *[b[0] for b in batches[:t + 1]]])
        want = grads((sol.z - ys).pow(2).sum(), [scale, *[b[0] for b in batches[:t + 1]]])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        converged = sol.status == int(Status.CONVERGED)
        by_convergence += int((converged & (seg < 5)).sum())
        halted = converged | (seg >= 5)
        assert step.halted.tolist() == halted.tolist()
        z, xs = sol.z.detach(), xs.detach()
    assert by_convergence >= 4      # the rule, not only the budget, refilled slots
    assert carry.halted.tolist() == halted.tolist()


# ---- (c) a user-marked halt (Q-head), an nn.Module, a tuple state, training ------------

class TwoLevel(nn.Module):
    """A tiny HRM/TRM-like block: state (y, z), z <- tanh(A z + B y + x), y <- tanh(C y + z)."""

    def __init__(self, d=3):
        super().__init__()
        self.A, self.B, self.C = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.q = nn.Linear(d, 2)      # (q_halt, q_continue)
        self.out = nn.Linear(d, d)

    def forward(self, state, x):
        y, z = state
        z = torch.tanh(self.A(z) + self.B(y) + x)
        return torch.tanh(self.C(y) + z), z


def test_a_user_marked_q_halt_trains_as_the_hand_loop():
    torch.manual_seed(2)
    model = TwoLevel().double()
    with torch.no_grad():
        model.q.bias.copy_(torch.tensor([0.2, -0.2]))     # some halts, some not
    twin = copy.deepcopy(model)
    batches = [(torch.randn(SLOTS, 3, dtype=F64), torch.randn(SLOTS, 3, dtype=F64)) for _ in range(9)]
    explore = torch.Generator().manual_seed(5)
    min_halt = [torch.randint(1, 3, (SLOTS,), generator=explore) for _ in batches]
    K, MAX = 3, 4

    def losses(m, state, targets, segment):
        y = state[0]
        pred = m.out(y)
        q = m.q(y)
        correct = ((pred - targets).abs() < 0.5).all(dim=1)
        loss = (pred - targets).pow(2).mean() + nn.functional.binary_cross_entropy_with_logits(
            q[:, 0], correct.double())
        halt = (q[:, 0] > q[:, 1]) & (segment >= min_halt[t])     # ACT with exploration
        return loss, halt.detach()

    zeros = lambda x: (torch.zeros_like(x), torch.zeros_like(x))  # noqa: E731
    carry = fpsolve.Carry(model, slots=SLOTS, z0=zeros, max_segments=MAX, criterion=fpsolve.Depth(K),
                          backward=fpsolve.Unroll(steps=1))
    opt, opt2 = torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(twin.parameters(), lr=0.2)
    state = xs = ys = None
    seg = torch.zeros(SLOTS, dtype=torch.int64)
    halted = torch.ones(SLOTS, dtype=torch.bool)
    marked = 0
    for t, (xb, yb) in enumerate(batches):
        step = carry.step(xb, targets=yb)
        loss, halt = losses(model, step.z, step.targets, step.segment)
        loss.backward()
        opt.step()
        opt.zero_grad()
        after = step.halt(halt)

        xs = xb if xs is None else where(halted, xb, xs)
        ys = yb if ys is None else where(halted, yb, ys)
        fresh = zeros(xs)
        state = fresh if state is None else tuple(where(halted, a, b) for a, b in zip(fresh, state))
        seg = torch.where(halted, 0, seg) + 1
        with torch.no_grad():
            for _ in range(K - 1):
                state = twin(state, xs)
        state = twin(state, xs)
        loss2, halt2 = losses(twin, state, ys, seg)
        loss2.backward()
        opt2.step()
        opt2.zero_grad()
        halted = (seg >= MAX) | halt2
        marked += int((halt2 & (seg < MAX)).sum())
        state = tuple(s.detach() for s in state)

        torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=1e-14)
        assert after.tolist() == halted.tolist() and step.segment.tolist() == seg.tolist()
        assert step.refilled.tolist() == (seg == 1).tolist()
    assert marked >= 2          # the head, not only the budget, halted slots
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ---- structures, no targets, errors ---------------------------------------------------

def test_dict_inputs_and_a_halt_head_segment():
    """x a dict; the segment's criterion a HaltHead, its HALTED counted as a halt by halt_on."""
    head = lambda z: 10.0 * (z[:, 0] - 2.5)  # noqa: E731
    f = lambda z, x: 0.5 * z + x["step"]  # noqa: E731
    carry = fpsolve.Carry(f, slots=2, z0=torch.zeros(2, 1), criterion=fpsolve.HaltHead(head), max_iter=2,
                          halt_on=(Status.HALTED,), backward="none", max_segments=None)
    s1 = carry.step({"step": torch.tensor([[2.0], [0.5]])})
    assert float(s1.z[0]) == 3.0 and s1.targets is None and s1.halted.tolist() == [True, False]
    assert s1.solution.status.tolist() == [int(Status.HALTED), int(Status.MAX_ITER)]
    s2 = carry.step({"step": torch.tensor([[9.0], [9.0]])})
    assert float(s2.z[0]) == 9.0 and s2.halted.tolist() == [True, False]
    s3 = carry.step({"step": torch.tensor([[4.0], [4.0]])})
    assert s3.x["step"].flatten().tolist() == [4.0, 0.5] and s3.refilled.tolist() == [True, False]
    assert s2.halted.tolist() == [True, False]       # an old step keeps what it decided
    assert s3.index.tolist() == [4, 1] and s3.segment.tolist() == [1, 3]


def test_bad_inputs_are_clear_errors():
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    carry = fpsolve.Carry(f, slots=3, criterion=fpsolve.Depth(2), backward="none")
    with pytest.raises(ValueError, match="the batch has 2 rows, but the carry has slots = 3"):
        carry.step(torch.ones(2, 1))
    with pytest.raises(ValueError, match="targets have 4 rows but x has 3"):
        carry.step(torch.ones(3, 1), targets=torch.ones(4))
    with pytest.raises(ValueError, match="share their batch size"):
        carry.step((torch.ones(3, 1), torch.ones(2, 1)))
    step = carry.step(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"one bool per slot, shape \(3,\)"):
        step.halt(torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        step.halt(torch.ones(3))
    with pytest.raises(ValueError, match="rows of shape"):
        carry.step(torch.ones(3, 2))
    carry.step(torch.ones(3, 1))
    with pytest.raises(RuntimeError, match="newest step"):
        step.halt([True, False, False])
    with pytest.raises(ValueError, match="targets were given"):
        carry.step(torch.ones(3, 1), targets=torch.ones(3))
    with pytest.raises(ValueError, match=r"slots=\.\.\.\) must be"):
        fpsolve.Carry(f, slots=0)
    with pytest.raises(ValueError, match="max_segments"):
        fpsolve.Carry(f, slots=2, max_segments=0)
    with pytest.raises(TypeError, match="unknown options"):
        fpsolve.Carry(f, slots=2, passes=3)
    with pytest.raises(ValueError, match="1 row or slots = 2 rows"):
        fpsolve.Carry(f, slots=2, z0=torch.zeros(3, 1))
    with pytest.raises(TypeError, match="x must be one floating tensor"):
        fpsolve.Carry(f, slots=2).step(torch.ones(2, 1, dtype=torch.int64))


def test_the_trm_example_trains_the_same_with_carry_and_by_hand(capsys):
    looped_trm = pytest.importorskip("looped_trm")
    out = looped_trm.main(["--steps", "12"])
    assert out["diff"] <= 1e-6 and out["accuracy"] == out["accuracy_hand"]
    h = out["halting"]   # (through stream: fixed depth runs every pass, a halt rule at most that)
    assert h["fixed depth"]["passes"] == 12.0 and h["Q head"]["passes"] <= 12.0 and h["fixed point"]["passes"] <= 12.0
    assert h["fixed depth"]["cells"] == out["accuracy"][0]
