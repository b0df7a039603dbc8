"""Issue 10's invariants as a property test: a status never lies and a bad sample never corrupts
the rest, for random maps, solvers, haltings, norms, tolerances, dtypes, state structures,
backward modes and halting criteria.

(i)   CONVERGED => the residual rule holds when recomputed at sol.z;
(ii)  sol.residual equals ||f(z) - z|| recomputed at sol.z (not for HALTED rows: they return f's
      newest output, and their residual is the size of the step that made it);
(iii) sol.z is finite for every row (every start here is finite), in every backward mode;
(iv)  halting="sample" with an f that treats samples independently: a sample's result equals
      its result solved alone (status, iterations, z), for `solve` and `solve_stream`;
(v)   DIVERGED only where f produced non-finite values or the iterates grew without bound;
(vi)  an exception raised by f reaches the caller with its own type.

Recomputation: f is evaluated again at sol.z on the whole batch, in float64 from the returned
values (bfloat16: fpsolve documents the criterion in float32 from the returned values and f's
output at them; float64 from the same values is at least as exact). f's kernels may round the
last bit differently for another number of rows, so the criterion and the residual are compared
with a slack of a few roundings of the working precision: SLACK[dtype] * (||f(z)|| + ||z||)
(float32's for bfloat16, whose criterion is computed in float32).

Violations found and not yet fixed are exempted by name (KNOWN_*, see `known_violations`), each
pinned by a strict xfail test at the end of this file: when a fix lands, that test fails, and
the test and its exemption go.

Profiles (tests/conftest.py): "fast" by default (`make test`), "full" with FPSOLVE_HYPOTHESIS=full
(>= 10,000 generated cases over this file; `--hypothesis-show-statistics` prints the counts).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, note, settings, strategies as st  # noqa: E402

import fpsolve  # noqa: E402
from fpsolve import Status  # noqa: E402

#: cases per test = the profile's max_examples times this weight (the main test gets the most)
EXAMPLES = settings.default.max_examples
SOLVE_EXAMPLES = EXAMPLES
STREAM_EXAMPLES = max(10, EXAMPLES // 4)
RAISE_EXAMPLES = max(10, EXAMPLES // 4)

#: relative slack in (i) and (ii), and the rounding slack per unit of ||f(z)|| + ||z||
REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}
SLACK = {torch.float64: 8 * 2.0 ** -52, torch.float32: 8 * 2.0 ** -23, torch.bfloat16: 8 * 2.0 ** -23}


def _optional(make) -> list:
    """Solver objects whose options may not exist yet (they are being added in parallel)."""
    try:
        return [make()]
    except TypeError:
        return []


SOLVERS: list = [
    "fixed_point", "anderson", "broyden",
    fpsolve.FixedPointIteration(damping=0.6),
    fpsolve.Anderson(m=2, beta=0.7),
    fpsolve.Anderson(m=8, regularization=1e-8),
    fpsolve.Broyden(memory=4),
    *_optional(lambda: fpsolve.Anderson(m=3, safeguard=False)),
    *_optional(lambda: fpsolve.Broyden(line_search=False)),
]
#: solve_stream: every built-in solver restarts single rows (`per_row`): all of them, with options.
STREAM_SOLVERS: list = ["fixed_point", fpsolve.FixedPointIteration(damping=0.6), "anderson", "broyden",
                       fpsolve.Anderson(m=3, safeguard=False), fpsolve.Broyden(line_search=False)]
BACKWARDS: list = ["implicit", "phantom", "unroll", "none", fpsolve.Unroll(steps=2),
                   fpsolve.Phantom(steps=3, damping=0.5), fpsolve.Implicit(solver="fixed_point", max_iter=30)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
#: per-row behaviour of the linear part: (kind, smallest and largest scale of A)
KINDS = {
    "contractive": (0.05, 0.9),
    "barely": (0.97, 0.999),
    "rotation": (0.95, 1.0),      # scaled orthogonal: oscillates, circles for ever at 1.0
    "flip": (0.9, 1.0),           # z -> -a z + b
    "expanding": (1.2, 3.0),
}


class MyErr(Exception):
    """An exception only f raises."""


@dataclass
class Case:
    """A batch problem: per row z -> A z + c b (tanh of it for family "tanh"; plus a mean over
    the batch for "mixing"), with NaN rows, a fault pass and the state's structure."""

    dtype: torch.dtype
    shapes: List[tuple]            # per leaf, the sample shape
    tuple_state: bool
    family: str                    # "affine" | "tanh" | "mixing"
    kinds: List[str]
    A: torch.Tensor                # [B, D, D]
    b: torch.Tensor                # [B, D]
    z0: torch.Tensor               # [B, D] float64
    nan_rows: torch.Tensor         # bool [B]: f returns nan_value there at every pass
    nan_value: float               # nan, inf or -inf
    fault_rows: torch.Tensor       # bool [B]: f returns nan_value there at pass fault_pass
    fault_pass: int
    mix: float
    c: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0))

    @property
    def B(self) -> int:
        return self.A.shape[0]

    def x(self, requires_grad: bool = False) -> dict:
        b = self.b.to(self.dtype).clone().requires_grad_(requires_grad)
        return {"A": self.A.to(self.dtype), "b": b, "row": torch.arange(self.B),
                "nan": self.nan_rows, "fault": self.fault_rows}

    def start(self) -> Any:
        return self.unflat(self.z0.to(self.dtype))

    def unflat(self, t: torch.Tensor) -> Any:
        if not self.tuple_state:
            return t.reshape(t.shape[0], *self.shapes[0])
        parts = torch.split(t, [math.prod(s) for s in self.shapes], dim=1)
        return tuple(p.reshape(t.shape[0], *s) for p, s in zip(parts, self.shapes))

    def apply(self, z: Any, x: dict, fault: bool = False) -> Any:
        leaves = z if self.tuple_state else (z,)
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in leaves], dim=1)
        y = torch.bmm(x["A"], flat.unsqueeze(-1)).squeeze(-1) + self.c.to(flat.dtype) * x["b"]
        if self.family == "mixing":
            y = y + self.mix * flat.mean(dim=0, keepdim=True)
        if self.family == "tanh":
            y = torch.tanh(y)
        y = torch.where(x["nan"][:, None], torch.full_like(y, self.nan_value), y)
        if fault:
            y = torch.where(x["fault"][:, None], torch.full_like(y, self.nan_value), y)
        return self.unflat(y)

    def may_grow(self) -> torch.Tensor:
        """Rows whose iterates can grow without bound (an expanding affine part, unbounded)."""
        grow = torch.tensor([k == "expanding" for k in self.kinds]) & (self.family != "tanh")
        if self.family == "mixing":   # the mean carries one row's growth to every row
            grow = grow.any().expand(self.B)
        return grow


def flat(z: Any) -> torch.Tensor:
    """The user's state as [B, D] float64."""
    leaves = z if isinstance(z, (tuple, list)) else (z,)
    return torch.cat([t.detach().reshape(t.shape[0], -1).double() for t in leaves], dim=1)


class Recorder:
    """f with fault injection and a per-row log: did f's output turn non-finite, and the
    largest ||z|| it received (rows are told apart by x["row"], as halting drops rows)."""

    def __init__(self, case: Case, raise_at: Optional[int] = None) -> None:
        self.case, self.raise_at, self.calls = case, raise_at, 0
        self.fault_in_grad = False   # the fault pass came with grad mode on (a backward's own passes)
        self.nonfinite = torch.zeros(case.B, dtype=torch.bool)
        self.peak = torch.zeros(case.B, dtype=torch.float64)
        self.inf_at_start = torch.zeros(case.B, dtype=torch.bool)   # f(z0) = ±inf (KNOWN_INF_START)

    def __call__(self, z: Any, x: dict) -> Any:
        k, self.calls = self.calls, self.calls + 1
        if k == self.raise_at:
            raise MyErr(f"raised at pass {k}")
        if k == self.case.fault_pass:
            self.fault_in_grad = torch.is_grad_enabled()
        out = self.case.apply(z, x, fault=k == self.case.fault_pass)
        rows, zf, of = x["row"], flat(z), flat(out)
        self.nonfinite[rows] |= ~torch.isfinite(of).all(dim=1)
        if k == 0:
            self.inf_at_start[rows] = of.isinf().any(dim=1)
        self.peak[rows] = torch.maximum(self.peak[rows], torch.linalg.vector_norm(zf, dim=1))
        return out


@st.composite
def cases(draw, halting: str) -> Case:
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 5))
    structure = draw(st.sampled_from(["flat", "grid", "tuple"]))
    if structure == "flat":
        shapes = [(draw(st.integers(1, 6)),)]
    elif structure == "grid":
        shapes = [(2, draw(st.integers(1, 3)))]
    else:
        shapes = [(draw(st.integers(1, 3)),), (draw(st.integers(1, 2)), 2)]
    D = sum(math.prod(s) for s in shapes)
    family = draw(st.sampled_from(["affine", "tanh", "mixing"] if halting == "batch" else ["affine", "tanh"]))
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=B, max_size=B))
    scales = [draw(st.floats(*KINDS[k])) for k in kinds]
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    mats = []
    for kind, s in zip(kinds, scales):
        M = torch.randn(D, D, generator=g, dtype=torch.float64)
        if kind == "rotation":
            M = torch.linalg.qr(M)[0]
        elif kind == "flip":
            M = -torch.eye(D, dtype=torch.float64)
        else:
            M = M / torch.linalg.matrix_norm(M, ord=2)
        mats.append(s * M)
    b_scale = 10.0 ** draw(st.sampled_from([-3, -1, 0, 1, 2]))
    b = torch.randn(B, D, generator=g, dtype=torch.float64) * b_scale
    z0 = torch.randn(B, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 1.0, 10.0]))
    nan_rows = torch.tensor(draw(st.lists(st.integers(0, 7), min_size=B, max_size=B))) == 7   # ~1 in 8
    fault_rows = torch.tensor(draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))) == 4  # ~1 in 5
    return Case(dtype=dtype, shapes=shapes, tuple_state=structure == "tuple", family=family, kinds=kinds,
                A=torch.stack(mats), b=b, z0=z0, nan_rows=nan_rows,
                nan_value=draw(st.sampled_from([math.nan, math.inf, -math.inf])),
                fault_rows=fault_rows, fault_pass=draw(st.integers(0, 25)),
                mix=draw(st.floats(-0.3, 0.3)) if family == "mixing" else 0.0)


@st.composite
def options(draw, case: Case, halting: str) -> dict:
    norm = draw(st.sampled_from(["l2", "inf"]))
    atol = draw(st.sampled_from([0.0, 1e-6, 1e-3]))
    rtol = draw(st.sampled_from([1e-8, 1e-5, 1e-3, 0.1, 0.65] + ([0.0] if atol > 0 else [])))
    opts = dict(solver=draw(st.sampled_from(SOLVERS)), atol=atol, rtol=rtol, norm=norm,
                max_iter=draw(st.integers(1, 40)), halting=halting)
    which = draw(st.sampled_from(["none", "residual", "stable", "halthead"]))
    lead = (lambda z: z[0]) if case.tuple_state else (lambda z: z)
    if which == "residual":
        opts["criterion"] = fpsolve.Residual(atol=atol, rtol=rtol, norm=norm)
    elif which == "stable":
        # (two classes per position, the sign of each entry: a readout needs C >= 2, issue 19 item 4)
        opts["criterion"] = fpsolve.Stable(lambda z: torch.stack((lead(z).flatten(1), -lead(z).flatten(1)), -1),
                                           patience=draw(st.integers(1, 3)))
    elif which == "halthead":
        t = draw(st.floats(-3.0, 3.0))
        opts["criterion"] = fpsolve.HaltHead(lambda z: 4.0 * (lead(z).flatten(1).float().sum(1) - t),
                                             threshold=draw(st.sampled_from([0.3, 0.5, 0.9])))
    return opts


def recomputed(case: Case, z: Any, norm: str) -> tuple:
    """(||f(z) - z||, ||f(z)||, rounding slack) per row at z, f evaluated on the whole batch."""
    with torch.no_grad():
        zd = z.detach() if not isinstance(z, tuple) else tuple(t.detach() for t in z)
        zf, of = flat(zd), flat(case.apply(zd, case.x()))
    if norm == "l2":
        r, s, zn = (torch.linalg.vector_norm(t, dim=1) for t in (of - zf, of, zf))
    else:
        r, s, zn = ((t).abs().amax(dim=1) for t in (of - zf, of, zf))
    return r, s, SLACK[case.dtype] * (s + zn)


def start_scale(case: Case) -> torch.Tensor:
    z0 = flat(case.start())
    with torch.no_grad():
        f0 = flat(case.apply(case.start(), case.x()))
    s = torch.maximum(torch.linalg.vector_norm(z0, dim=1), torch.linalg.vector_norm(f0, dim=1).nan_to_num(0.0))
    return s.clamp_min(math.sqrt(z0.shape[1]))


def run(case: Case, opts: dict, grad: bool, backward: Any, record: bool = False, f: Optional[Recorder] = None):
    f = Recorder(case) if f is None else f
    x = case.x(requires_grad=grad)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", fpsolve.ConvergenceWarning)
        sol = fpsolve.solve(f, case.start(), x, backward=backward, record=record, **opts)
    return sol, f, x


@settings(max_examples=SOLVE_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), halting=st.sampled_from(["sample", "batch"]), grad=st.booleans(),
       backward=st.sampled_from(BACKWARDS), record=st.booleans())
def test_statuses_never_lie(data, halting, grad, backward, record):
    case = data.draw(cases(halting), label="case")
    opts = data.draw(options(case, halting), label="options")
    case.c = torch.tensor(1.0, dtype=case.dtype, requires_grad=grad)
    sol, f, x = run(case, opts, grad, backward, record)
    B, dtype, st_ = case.B, case.dtype, sol.status
    note(f"status {st_.tolist()} iterations {sol.iterations.tolist()} residual {sol.residual.tolist()}")
    conv, diverged = st_ == Status.CONVERGED, st_ == Status.DIVERGED
    for name in sorted({Status(v).name for v in st_.tolist()}):
        event(f"status {name}")

    # bookkeeping
    assert sol.iterations.shape == (B,) and ((sol.iterations >= 1) & (sol.iterations <= opts["max_iter"])).all()
    assert torch.equal(sol.converged, conv | (st_ == Status.HALTED))
    other = opts.get("criterion") is not None and not isinstance(opts["criterion"], fpsolve.Residual)
    assert not (st_ == Status.HALTED).any() or other, "HALTED without a criterion other than Residual"
    if halting == "sample":
        assert (sol.iterations[st_ == Status.MAX_ITER] == opts["max_iter"]).all()
        assert sol.evaluations >= int(sol.iterations.sum())   # (passes after a halt may be spent)
    else:
        # (Unroll() records the batch again when a row died: those passes are compute spent too)
        again = backward in ("unroll", fpsolve.Unroll()) and grad and bool((st_ == Status.DIVERGED).any())
        assert (sol.iterations == sol.iterations[0]).all()
        assert sol.evaluations == B * int(sol.iterations[0]) or (again and sol.evaluations > B * int(sol.iterations[0]))
    if record:
        assert sol.trace.shape == (int(sol.iterations.max()), B)
        if halting == "sample":
            after = torch.arange(sol.trace.shape[0])[:, None] >= sol.iterations[None, :]
            assert sol.trace[after].isnan().all(), "trace must be nan once a sample has halted"

    # (iii) never a non-finite z
    finite = torch.isfinite(flat(sol.z)).all(dim=1)
    full_unroll = backward == "unroll" or (isinstance(backward, fpsolve.Unroll) and backward.steps is None)
    known = known_violations(case, f, sol, full_unroll)
    assert (finite | known).all(), f"(iii) non-finite rows in sol.z: {flat(sol.z)}"
    if known.any():
        event("exempt: a KNOWN_* violation (batch swap under a mixing f)")
    # requires_grad as API.md says
    wants = grad and backward != "none"
    z_leaf = sol.z[0] if case.tuple_state else sol.z
    if not wants:
        assert not z_leaf.requires_grad

    # (i) and (ii) at the returned z
    r, s, slack = recomputed(case, sol.z, opts["norm"])
    rel = REL[dtype]
    allowed = opts["atol"] + opts["rtol"] * s
    bad_conv = conv & finite & ~known & ~(r <= allowed * (1 + rel) + slack)
    assert not bad_conv.any(), f"(i) CONVERGED rows {bad_conv.nonzero().flatten().tolist()}: recomputed {r.tolist()}, allowed {allowed.tolist()}"
    rep = sol.residual.detach().double()
    # (f is stateful under fault injection: a row whose only evaluation at sol.z was the faulty one
    # reports that evaluation's non-finite residual)
    exempt = (~torch.isfinite(rep) & case.fault_rows & diverged) | ~finite | known
    # (a HALTED row returns f's newest output, and its residual is the size of the step that made
    # it, ||z_k - z_(k-1)||: API.md, read-out criteria; (ii) is not defined there)
    exempt |= st_ == Status.HALTED
    same = torch.isclose(rep, r, rtol=rel, atol=0) | ((rep - r).abs() <= slack) | (rep.isnan() & r.isnan())
    assert (same | exempt).all(), f"(ii) sol.residual {rep.tolist()} vs recomputed {r.tolist()}"
    if isinstance(opts.get("criterion"), fpsolve.HaltHead):   # HALTED: the head's rule holds at z
        hh = opts["criterion"]
        with torch.no_grad():
            p = torch.sigmoid(hh.head(sol.z).reshape(B).float())
        halted = (st_ == Status.HALTED) & finite & ~known
        if halting == "batch" and not (st_ == Status.HALTED).all():
            halted = halted & False   # (budget spent first: the batch stays at its last iterate)
        assert (p[halted] >= hh.threshold - 1e-6).all()

    # (v) DIVERGED only where f's output turned non-finite or the iterates grew without bound;
    # and the converse: a non-finite residual at the returned z is DIVERGED, never another status
    grew = f.peak >= 1e5 * start_scale(case)
    allowed_div = f.nonfinite | case.may_grow()
    assert not (diverged & ~allowed_div & ~grew).any(), (
        f"(v) DIVERGED rows {(diverged & ~allowed_div & ~grew).nonzero().flatten().tolist()} on a bounded "
        f"map without non-finite values (peak ||z|| {f.peak.tolist()})")
    if (diverged & ~allowed_div & grew).any():
        event("DIVERGED: a bounded row whose accelerated iterates grew without bound")
    lies = ~torch.isfinite(rep) & ~diverged & ~known
    assert not lies.any(), f"(v) rows {lies.nonzero().flatten().tolist()} have residual {rep.tolist()} but status {st_.tolist()}"

    # gradients: a failing row never poisons the others (shared c, per-row b)
    if wants and halting == "sample" and z_leaf.requires_grad:
        loss = flat_sum(sol.z)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fpsolve.ConvergenceWarning)
            loss.backward()
        ok = conv & ~f.nonfinite
        assert torch.isfinite(x["b"].grad[ok]).all(), f"non-finite gradient on converged rows {x['b'].grad}"
        if not (diverged | f.nonfinite).any():
            assert torch.isfinite(case.c.grad).all()

    # (iv) halting="sample", f independent per row: each row equals its solve alone
    if halting == "sample":
        i = data.draw(st.integers(0, B - 1), label="row solved alone")
        alone_case = sub_case(case, i)
        alone, f_alone, _ = run(alone_case, opts, grad, backward, record)
        if bool(known[i]) or bool(known_violations(alone_case, f_alone, alone, full_unroll)[0]):
            return   # (a KNOWN_* violation in the batch or in the solve alone)
        if full_unroll and wants and bool(diverged.any()) and bool(case.fault_rows.any()):
            # Unroll() records the live rows again once a row died (API: a dead row's gradient is
            # exactly zero), so f is called more times than passes: the fault injection, which
            # counts calls, then hits another pass than in the solve alone.
            event("exempt (iv): Unroll() re-recorded the live rows with a call-counting fault")
            return
        assert alone.status.tolist() == [int(st_[i])], (alone.status, st_[i])
        assert alone.iterations.tolist() == [int(sol.iterations[i])], (alone.iterations, sol.iterations[i])
        torch.testing.assert_close(flat(alone.z), flat(sol.z)[i:i + 1], rtol=1e-6 if dtype == torch.float64 else 1e-3,
                                   atol=1e-9 * float(start_scale(case)[i]))


def known_violations(case: Case, f: Recorder, sol: Any, full_unroll: bool) -> torch.Tensor:
    """Rows exempt because of a violation already pinned by a strict xfail test below."""
    known = torch.zeros(case.B, dtype=torch.bool)
    if case.family == "mixing":      # (the mean carries one row's trouble to every row)
        known = known.any().expand(case.B)
        # KNOWN_BATCH_SWAP: a row that dies at the pass where the batch stops is swapped back to its
        # last finite iterate after the others' residuals were taken (under a mixing f they belong
        # to an iterate that is not returned)
        if bool((sol.status == Status.DIVERGED).any()):
            known = torch.ones_like(known)
    return known


def flat_sum(z: Any) -> torch.Tensor:
    leaves = z if isinstance(z, tuple) else (z,)
    return sum(t.float().sum() for t in leaves)


def sub_case(case: Case, i: int) -> Case:
    """Row i of a case as a batch of one (the same map, the same fault pass)."""
    sl = slice(i, i + 1)
    return Case(dtype=case.dtype, shapes=case.shapes, tuple_state=case.tuple_state, family=case.family,
                kinds=case.kinds[sl], A=case.A[sl], b=case.b[sl], z0=case.z0[sl], nan_rows=case.nan_rows[sl],
                nan_value=case.nan_value, fault_rows=case.fault_rows[sl], fault_pass=case.fault_pass, mix=case.mix,
                c=torch.tensor(1.0, dtype=case.dtype, requires_grad=case.c.requires_grad))


@settings(max_examples=STREAM_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), solver=st.sampled_from(STREAM_SOLVERS), slots=st.integers(1, 4),
       batch=st.integers(1, 3), check_every=st.sampled_from([None, 1, 3]))
def test_stream_rows_equal_their_solve_alone(data, solver, slots, batch, check_every):
    """(iv) for solve_stream: every row equals `solve` of that row alone (no fault pass: a pass of
    the stream is not a pass of one sample)."""
    case = data.draw(cases("sample"), label="case")
    case.fault_rows = torch.zeros_like(case.fault_rows)
    opts = data.draw(options(case, "sample"), label="options")
    opts.pop("halting")
    opts["solver"] = solver
    x = case.x()
    x["z0"] = case.z0.to(case.dtype)
    inputs = [{k: v[a:a + batch] for k, v in x.items()} for a in range(0, case.B, batch)]
    f = Recorder(case)
    sol = fpsolve.solve_stream(f, inputs, slots=slots, z0=lambda xr: case.unflat(xr["z0"].clone()),
                               check_every=check_every, **opts)
    assert torch.isfinite(flat(sol.z)).all()
    plain = solver == "fixed_point" or isinstance(solver, fpsolve.FixedPointIteration)
    crit = opts.get("criterion")
    # Every stream row is honest by itself: CONVERGED => the residual rule holds at its z (the
    # criterion's own tolerance when it is a Residual), with the rounding slack of (i).
    rule = crit if isinstance(crit, fpsolve.Residual) else fpsolve.Residual(opts["atol"], opts["rtol"], opts["norm"])
    r, fnorm, slack = recomputed(case, sol.z, rule.norm)
    conv = sol.status == int(Status.CONVERGED)
    allowed = rule.atol + rule.rtol * fnorm
    assert not (conv & ~(r <= allowed * (1 + REL[case.dtype]) + slack)).any(), (r, allowed)
    if not plain:
        # The contract for Anderson and Broyden (docs/streaming.md): a slot's per-row step is the
        # same algorithm as the batched step with other rounding, so the two runs may part where
        # a decision lies within rounding of a threshold (a tolerance, the safeguard's or the line
        # search's test, the budget); only honesty is promised, checked above.
        event("stream: accelerated solver: honesty checked, equality not promised")
        return
    for i in range(case.B):
        with torch.no_grad():
            alone = fpsolve.solve(Recorder(sub_case(case, i)), sub_case(case, i).start(), sub_case(case, i).x(),
                                  backward="none", **opts)
        assert int(sol.status[i]) == int(alone.status[0]), (i, sol.status, alone.status)
        assert int(sol.iterations[i]) == int(alone.iterations[0]), (i, sol.iterations, alone.iterations)
        rtol = 1e-6 if case.dtype == torch.float64 else 1e-3
        atol = 1e-9 * float(start_scale(case)[i])
        if not torch.allclose(flat(sol.z)[i:i + 1], flat(alone.z), rtol=rtol, atol=atol):
            # MAX_ITER's answer is the best iterate of an unconverged run: a tie between two
            # residuals (e.g. under an isometry) can pick another iterate of the same residual.
            assert int(sol.status[i]) in (int(Status.MAX_ITER), int(Status.DIVERGED)), (i, sol.z, alone.z)
            assert torch.allclose(sol.residual[i:i + 1].double(), alone.residual.double(),
                                  rtol=1e-9, atol=1e-12), (i, sol.residual, alone.residual)
            event("stream: an unconverged row's best iterate picked differently (a tie)")


@settings(max_examples=RAISE_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), halting=st.sampled_from(["sample", "batch"]), grad=st.booleans(),
       backward=st.sampled_from(BACKWARDS), raise_at=st.integers(0, 30), stream=st.booleans())
def test_an_exception_from_f_reaches_the_caller_with_its_own_type(data, halting, grad, backward, raise_at, stream):
    """(vi) f raising MyErr at pass k: the caller catches MyErr (solve and solve_stream)."""
    case = data.draw(cases(halting), label="case")
    opts = data.draw(options(case, halting), label="options")
    case.c = torch.tensor(1.0, dtype=case.dtype, requires_grad=grad)
    f = Recorder(case, raise_at)
    if stream:
        opts.pop("halting")
        opts["solver"] = data.draw(st.sampled_from(STREAM_SOLVERS))
        one_row = case.start()[:1] if not case.tuple_state else tuple(t[:1] for t in case.start())
    raised = None
    try:
        if stream:
            fpsolve.solve_stream(f, [case.x()], slots=max(1, case.B - 1), z0=one_row, **opts)
        else:
            run(case, opts, grad, backward, f=f)
    except MyErr as err:
        raised = err
    except Exception as err:   # any other type is the violation
        raise AssertionError(f"(vi) f raised MyErr at pass {raise_at}; the caller got {type(err).__name__}: {err}") from err
    if raised is None:
        assert f.calls <= raise_at, "f reached the pass where it raises, but no MyErr came out"
    else:
        assert str(raised) == f"raised at pass {raise_at}"


# Violations the property test found, each pinned by a minimal reproduction (strict: when the
# fix lands the test XPASSes and fails; then drop it and the matching exemption above).

@pytest.mark.parametrize("backward", ["none", "phantom"])
def test_an_infinite_f_at_the_start_is_diverged(backward):
    """Found by the property test (was KNOWN_INF_START: an infinite divergence limit)."""
    W = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)      # row 1: f returns +inf
    f = lambda z, x: torch.where(x > 0, torch.full_like(z, math.inf), W * z + 1)  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point", max_iter=1,
                        backward=backward)
    assert sol.status[1] == Status.DIVERGED, sol.status
    assert torch.isfinite(sol.z).all(), sol.z


@pytest.mark.parametrize("backward", [fpsolve.Phantom(steps=1), fpsolve.Unroll(steps=2)])
def test_a_nan_in_the_phantom_passes_never_reaches_sol_z(backward):
    """Found by the property test (was KNOWN_PHANTOM_NAN: value + (graph - graph.detach()))."""
    W = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    calls = []

    def f(z, x):   # finite during the solve (3 passes), NaN at the first pass after it
        calls.append(1)
        return W * z + x if len(calls) != 4 else torch.full_like(z, math.nan)

    sol = fpsolve.solve(f, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                        solver="fixed_point", max_iter=3, backward=backward)
    assert sol.status[0] == Status.MAX_ITER and len(calls) > 3
    assert torch.isfinite(sol.z).all(), sol.z


@pytest.mark.parametrize("dtype, solver", [(torch.float32, "broyden"), (torch.bfloat16, "anderson")])
def test_unroll_through_an_accelerated_solver_has_finite_gradients(dtype, solver):
    """Was KNOWN_UNROLL_NAN: once the solver's differences vanish (residual at rounding level),
    Anderson's singular Gram system and Broyden's 1/denominator sent NaN back through Unroll()."""
    _unroll_through_a_solver(dtype, solver)


def test_unroll_picks_answers_by_gather_so_unused_iterates_send_no_nan():
    """Anderson(m=8) in float32 was a KNOWN_UNROLL_NAN case while the answers were merged with
    torch.where (whose unused branch passes 0 * nan back); the loop now gathers the rows."""
    _unroll_through_a_solver(torch.float32, fpsolve.Anderson(m=8, regularization=1e-8))


def _unroll_through_a_solver(dtype, solver):
    c = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    A = torch.tensor([[[-0.9375, 0.0], [0.0, -0.9375]], [[0.9844, 0.0], [0.0, 0.5]]], dtype=dtype)
    b = torch.tensor([[-0.0011, -0.0014], [6e-4, -1e-3]], dtype=dtype)
    f = lambda z, x: torch.bmm(x[0], z.unsqueeze(-1)).squeeze(-1) + c * x[1]  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(2, 2, dtype=dtype), (A, b), solver=solver, rtol=1e-8, max_iter=6,
                        backward="unroll")
    sol.z.float().sum().backward()
    assert torch.isfinite(sol.z).all()
    assert torch.isfinite(c.grad), c.grad


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_unroll_through_steps_at_an_exact_fixed_point_has_finite_gradients(solver):
    """Was KNOWN_UNROLL_NAN in float64: steps at an exact fixed point (residual 0, kept going by
    Stable(patience=3)) gave NaN gradients under Unroll() (tests/test_unroll_degenerate.py)."""
    c = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[-140.0], [40.0]], dtype=torch.float64)       # tanh saturates: f(z) = ±1 exactly
    f = lambda z, x: torch.tanh(0.98 * z + c * x)  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver=solver, max_iter=4, backward="unroll",
                        criterion=fpsolve.Stable(lambda z: torch.cat((z, -z), 1), patience=3))
    sol.z.sum().backward()
    assert torch.isfinite(c.grad), c.grad                              # fixed_point gives 0


@pytest.mark.xfail(strict=True, reason="KNOWN_BATCH_SWAP: halting='batch', f mixes samples, a row turns "
                   "non-finite at the last pass: it is swapped back to its last finite iterate after the other "
                   "rows' residuals were taken, so their sol.residual is not the residual at sol.z")
def test_batch_halting_residuals_belong_to_the_returned_iterate_when_a_row_dies_last():
    g = lambda z, x: 0.5 * z + x + 0.2 * z.mean(0, keepdim=True)  # noqa: E731
    calls = []

    def f(z, x):   # row 1 turns NaN at the third (= last) pass
        calls.append(1)
        return g(z, x) if len(calls) != 3 else torch.where(torch.arange(3)[:, None] == 1, math.nan, g(z, x))

    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    sol = fpsolve.solve(f, torch.zeros(3, 1, dtype=torch.float64), x, solver="fixed_point", halting="batch",
                        max_iter=3, rtol=1e-12)
    assert sol.status.tolist() == [Status.MAX_ITER, Status.DIVERGED, Status.MAX_ITER]
    r = (g(sol.z, x) - sol.z).abs().flatten()
    torch.testing.assert_close(sol.residual[[0, 2]], r[[0, 2]])   # reported 0.73, 1.23; true 0.637, 1.137


@pytest.mark.parametrize("backward", [fpsolve.Phantom(steps=2), fpsolve.Unroll(steps=2)])
def test_a_diverged_row_never_spreads_nan_through_the_phantom_passes(backward):
    """Found by the property test (fixed on main in 8bce8ee): the NaN used to reach a CONVERGED row."""
    W = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)      # row 1: f returns NaN
    f = lambda z, x: torch.where(x > 0, math.nan, W * z + 1 + 0.1 * z.mean(0, keepdim=True))  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point", halting="batch",
                        max_iter=30, backward=backward)
    assert sol.status.tolist() == [Status.CONVERGED, Status.DIVERGED]
    assert torch.isfinite(sol.z).all(), sol.z


def test_batch_halting_a_row_that_diverges_last_reports_the_residual_at_its_returned_z():
    """Found by the property test (fixed on main in 8bce8ee): it reported 1e7 for a z whose residual is 1e6."""
    x = torch.tensor([[0.5], [10.0]], dtype=torch.float64)      # row 1 grows without bound
    f = lambda z, x: x * z + 1  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=torch.float64), x, solver="fixed_point", halting="batch", max_iter=8)
    assert sol.status.tolist() == [Status.MAX_ITER, Status.DIVERGED]
    torch.testing.assert_close(sol.residual, (f(sol.z, x) - sol.z).abs().flatten())


def test_broyden_line_search_recorded_for_unroll_treats_samples_independently():
    """Once KNOWN_BROYDEN_UNROLL: recorded for Unroll, a step that rejected some samples left the
    batch's test in its "calm" form (every t taken as 1) while t had been halved, so a sample's
    later step length depended on whether a batch mate was rejected at the same step."""
    f = lambda z, x: torch.bmm(x[0], z.unsqueeze(-1)).squeeze(-1) + x[1]  # noqa: E731
    g = torch.Generator().manual_seed(5)
    B, n = 4, 2
    A = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    scale = torch.rand(B, generator=g, dtype=torch.float64) * 2.5 + 0.2     # 1.08, 1.13, 2.09, 1.47
    A = A / torch.linalg.matrix_norm(A, ord=2)[:, None, None] * scale[:, None, None]
    b = (torch.randn(B, n, generator=g, dtype=torch.float64) * 1e-3).requires_grad_()
    kw = dict(solver="broyden", rtol=1e-8, max_iter=5, backward="unroll")
    full = fpsolve.solve(f, torch.zeros(B, n, dtype=torch.float64), (A, b), **kw)
    alone = fpsolve.solve(f, torch.zeros(1, n, dtype=torch.float64), (A[3:], b[3:]), **kw)
    assert full.status[3] == alone.status[0] and full.iterations[3] == alone.iterations[0]
    torch.testing.assert_close(full.z[3:], alone.z, rtol=1e-9, atol=1e-12)   # differ by 2.5e-4


# --------------------------------------------------------------------------------------------
# (vii) issue 19, item 1: a DIVERGED row contributes exactly zero to every gradient
# --------------------------------------------------------------------------------------------

DEAD_BACKWARDS = ["implicit", "phantom", fpsolve.Unroll(), fpsolve.Unroll(checkpoint=3), fpsolve.Unroll(steps=3),
                  fpsolve.Unroll(steps=4, checkpoint=2),
                  fpsolve.Phantom(steps=2, damping=0.7)]


@settings(max_examples=max(10, EXAMPLES // 4), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), halting=st.sampled_from(["sample", "batch"]), backward=st.sampled_from(DEAD_BACKWARDS),
       solver=st.sampled_from(["fixed_point", "anderson", "broyden"]), correction=st.booleans())
def test_a_nan_row_gives_zero_gradient_and_the_live_rows_their_own(data, halting, backward, solver, correction):
    """Fault injection: rows whose input holds a nan are DIVERGED; a loss on the live rows gets
    finite gradients, equal to those of the live rows solved alone (an f that treats samples
    independently), in every backward mode (correction path included)."""
    B = data.draw(st.integers(2, 6), label="B")
    n = data.draw(st.integers(1, 4), label="n")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    W = (0.6 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)).requires_grad_()
    x = torch.randn(B, n, generator=gen, dtype=torch.float64)
    dead = data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B - 1, unique=True), label="dead")
    for i in dead:
        x[i, data.draw(st.integers(0, n - 1), label="entry")] = float("nan")
    live = torch.tensor([i for i in range(B) if i not in dead])
    f = lambda z, x: torch.tanh(z @ W + x)  # noqa: E731
    options = dict(solver=solver, halting=halting, backward=backward, rtol=1e-10, max_iter=60)
    if correction:
        options["correction"] = fpsolve.Correction(passes=(2, 3))

    def grad(xs):
        W.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = fpsolve.solve(f, torch.zeros_like(xs), xs, **options)
            keep = sol.status != int(Status.DIVERGED)
            loss = sol.z[keep].pow(2).sum() + sum(p[keep].sum() for p in (sol.path or []))
            if loss.requires_grad:   # (not when every live answer is the start z0, which is detached)
                loss.backward()
        return sol, torch.zeros_like(W) if W.grad is None else W.grad.clone()

    sol, g = grad(x)
    assert (sol.status[dead] == int(Status.DIVERGED)).all()
    assert torch.isfinite(g).all(), f"{backward}: a dead row poisoned the weight gradient"
    alone, g_alone = grad(x[live])
    assert torch.equal(sol.status[live], alone.status)
    torch.testing.assert_close(g, g_alone, rtol=1e-7, atol=1e-9)


def test_a_dead_row_under_batch_unroll_gives_zero_gradient():
    """Unroll() under halting="batch" records the batch again with the dead row held at its
    start and its nan input zeroed (it was a strict xfail)."""
    W = (0.3 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    sol = fpsolve.solve(lambda z, x: torch.tanh(z @ W + x), torch.zeros_like(x), x, halting="batch",
                        backward=fpsolve.Unroll())
    sol.z[sol.converged].sum().backward()
    assert torch.isfinite(W.grad).all()
