"""Looped language models (issue 21, first part): LoopedLM's joint solve and `generate`'s
token-by-token decoding against a cache of converged keys and values."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fpsolve
from fpsolve import Status

F64 = torch.float64
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [3]]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return fpsolve.LoopedLM(vocab_size=11, width=32, heads=4, core_layers=2, max_len=24).double().eval()


def decode(lm, prompts, **kw):
    """The results in prompt order (generate yields them as sequences finish)."""
    kw = {"max_new_tokens": 6, "rtol": 1e-10, "max_iter": 300, **kw}
    out = sorted(fpsolve.generate(lm, prompts, **kw), key=lambda g: g.index)
    assert [g.index for g in out] == list(range(len(prompts)))
    return out


@pytest.mark.parametrize("warm_start", [True, False])
def test_decoding_reproduces_the_joint_fixed_point(lm, warm_start):
    """Forward substitution: the greedy tokens of token-by-token decoding are the greedy tokens
    of the joint solve over the whole sequence, and the states agree within the tolerance."""
    for g, p in zip(decode(lm, PROMPTS, warm_start=warm_start), PROMPTS):
        seq = torch.tensor([p + g.tokens])
        with torch.no_grad():
            logits, sol = lm(seq, rtol=1e-12, max_iter=600)
        assert sol.converged.all()
        assert logits[0, len(p) - 1:-1].argmax(-1).tolist() == g.tokens
        assert all(s == Status.CONVERGED for s in g.status) and len(g.iterations) == len(g.tokens)


def test_results_do_not_depend_on_the_batch(lm):
    together = decode(lm, PROMPTS, slots=4)
    for i, p in enumerate(PROMPTS):
        alone = decode(lm, [p], slots=1)[0]
        assert (alone.tokens, alone.iterations) == (together[i].tokens, together[i].iterations)


def test_the_cache_holds_one_entry_per_position_and_layer(lm):
    dec = fpsolve._generate._Decoder(lm, [torch.tensor(PROMPTS[0])], fpsolve._options.Options.make(
        "t", fpsolve._options.SOLVE_DEFAULTS, {"rtol": 1e-10, "max_iter": 300, "backward": "none", "check_every": 2}),
        2, 5, True, None, 0.0, 0, False)
    (out,) = list(dec.run())
    assert int(dec.pos[0]) == len(PROMPTS[0]) + len(out.tokens) - 1   # the last token's state is not solved
    assert len(dec.cache) == len(lm.core_layers)
    assert all(k.shape[2] == lm.max_len for kv in dec.cache for k in kv)


def test_a_read_out_criterion_and_a_stop_token(lm):
    crit = fpsolve.OutputKL(lambda h: lm.coda(h), tol=1e-6)
    out = decode(lm, PROMPTS, criterion=crit, rtol=1e-4)
    assert all(s == Status.HALTED for g in out for s in g.status[1:])
    first = out[0].tokens[0]
    stopped = decode(lm, PROMPTS[:1], stop_token=first)[0]
    assert stopped.tokens == [first] and stopped.finish == "stop"


def test_a_diverging_token_ends_its_sequence_and_no_other(lm):
    broken = fpsolve.LoopedLM(vocab_size=11, width=32, heads=4, core_layers=2, max_len=24).double().eval()
    broken.load_state_dict(lm.state_dict())
    with torch.no_grad():
        broken.embed.weight[10] = float("nan")   # token 10 poisons the state of its position
    out = decode(broken, [[1, 2, 3], [6, 7, 8, 9, 10]])
    assert out[1].finish == "diverged" and out[1].tokens == []
    assert out[0].tokens == decode(lm, [[1, 2, 3]])[0].tokens


def test_sampling_is_seeded(lm):
    a = decode(lm, PROMPTS, temperature=1.0, seed=3)
    b = decode(lm, PROMPTS, temperature=1.0, seed=3)
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_bad_input_is_a_clear_error_before_any_work(lm):
    with pytest.raises(ValueError, match="empty"):
        fpsolve.generate(lm, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_len"):
        fpsolve.generate(lm, [list(range(10)) * 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        fpsolve.generate(lm, [[1, 11]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fpsolve.generate(lm, [[1, 2]], max_new_tokens=0)
    with pytest.raises(TypeError, match="integer token ids"):
        fpsolve.generate(lm, [[0.5, 1.0]], max_new_tokens=2)


def test_the_forward_trains_with_any_backward_mode():
    torch.manual_seed(1)
    lm = fpsolve.LoopedLM(vocab_size=7, width=16, heads=2, max_len=12).double()
    tokens = torch.randint(0, 7, (3, 8))
    for backward in ("implicit", fpsolve.Unroll(steps=2), fpsolve.Phantom(steps=2)):
        lm.zero_grad()
        logits, sol = lm(tokens, backward=backward, criterion=fpsolve.Depth(6), max_iter=10) \
            if isinstance(backward, fpsolve.Unroll) else lm(tokens, backward=backward, rtol=1e-8, max_iter=200)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
        assert lm.embed.weight.grad is not None


# ---- depth-wise continuous batching ---------------------------------------------------------

MANY = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [3], [2, 2, 2, 2], [9, 1], [5, 6, 7]]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_continuous_batching_matches_decoding_each_prompt_alone(lm, solver):
    """More prompts than slots, sequences of several lengths: a finished sequence's slot takes
    the next prompt; tokens and per-token iterations are those of each prompt decoded alone,
    whatever the slots and the look cadence (a refilled slot's solver history starts afresh)."""
    alone = [decode(lm, [p], slots=1, max_new_tokens=2 + i % 4, rtol=1e-6, solver=solver)[0]
             for i, p in enumerate(MANY)]
    for slots, every in ((2, 1), (3, 2), (8, 5)):
        out = sorted(fpsolve.generate(lm, MANY, max_new_tokens=5, slots=slots, check_every=every, rtol=1e-6,
                                      max_iter=300, solver=solver), key=lambda g: g.index)
        for a, g in zip(alone, out):
            n = len(a.tokens)
            assert (g.tokens[:n], g.iterations[:n]) == (a.tokens, a.iterations), (slots, every)


def test_the_core_sees_a_fixed_shape_and_every_slot_stays_busy(lm):
    shapes, caps = [], set()
    core = lm.core

    def spy(h, e, cache=None):
        shapes.append((tuple(h.shape), cache is None))
        if cache is not None:
            caps.add(cache.layers[0][0].shape[2])
        return core(h, e, cache)

    lm.core = spy
    try:
        out = list(fpsolve.generate(lm, MANY, max_new_tokens=4, slots=3, rtol=1e-6, max_iter=300))
    finally:
        del lm.core
    assert sorted(g.index for g in out) == list(range(len(MANY)))
    decoding = {s for s, prefill in shapes if not prefill}
    assert decoding == {(3, 1, lm.width)}
    assert all(s[1] > 1 or s[0] < 3 for s, prefill in shapes if prefill)   # (prefills: the admitted prompts)
    # the cached positions attended to grow in blocks: a compiled core recompiles a few times at most
    block = fpsolve._generate.CACHE_BLOCK
    assert caps <= {min(lm.max_len, b) for b in range(block, lm.max_len + block, block)}


def test_compiled_bookkeeping_decodes_the_same(lm):
    kw = dict(max_new_tokens=4, slots=3, rtol=1e-6, check_every=2)
    eager = decode(lm, MANY[:4], **kw)
    comp = decode(lm, MANY[:4], compile=True, **kw)
    assert [(g.tokens, g.iterations) for g in comp] == [(g.tokens, g.iterations) for g in eager]


def test_sampled_tokens_do_not_depend_on_the_batch(lm):
    """Each token is sampled with a generator keyed by (seed, prompt index, position): the same
    prompts give the same tokens whatever the slots; repeated prompts still differ."""
    kw = dict(temperature=1.5, seed=7, max_new_tokens=5, rtol=1e-6)
    together = decode(lm, MANY, slots=3, **kw)
    assert [g.tokens for g in decode(lm, MANY, slots=1, check_every=3, **kw)] == [g.tokens for g in together]
    assert [g.tokens for g in decode(lm, MANY, slots=3, **{**kw, "seed": 8})] != [g.tokens for g in together]
    same = decode(lm, [MANY[0]] * 4, slots=2, **kw)
    assert len({tuple(g.tokens) for g in same}) > 1


class CountingLM(torch.nn.Module):
    """A user's own looped LM through the protocol: token t's state is h = a_t h + e_t, its next
    token t + 1 (mod 5); token 4 has a_t = 3, so its state diverges."""

    vocab_size, max_len, width = 5, 16, 5

    def prelude(self, tokens, positions):
        return torch.nn.functional.one_hot(tokens, 5).double()

    def core(self, h, e, cache=None):
        a = torch.where(e[..., 4:5] > 0, 3.0, 0.5).double()
        return a * h + e

    def keys_values(self, h, e, cache=None):
        return [(h[:, None], h[:, None])]

    def coda(self, h):
        return 10 * torch.roll(h, 1, dims=-1)


def test_a_diverging_token_mid_sequence_ends_its_sequence_cleanly():
    out = decode(CountingLM(), [[0], [2], [1, 2]], slots=2, max_new_tokens=3, rtol=1e-8, max_iter=80)
    assert [g.tokens for g in out] == [[1, 2, 3], [3, 4], [3, 4]]
    assert [g.finish for g in out] == ["length", "diverged", "diverged"]
    assert all(s == Status.CONVERGED for g in out for s in g.status)
    assert len(out[1].iterations) == 2


@settings(max_examples=max(20, settings.default.max_examples // 50), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(prompts=st.lists(st.lists(st.integers(0, 10), min_size=1, max_size=6), min_size=1, max_size=6),
       slots=st.integers(1, 4), every=st.integers(1, 4), new=st.integers(1, 5),
       criterion=st.sampled_from(["residual", "kl", "depth"]), warm=st.booleans())
def test_property_results_never_depend_on_batch_mates(lm, prompts, slots, every, new, criterion, warm):
    """Whatever the prompts, slots, look cadence and criterion, each prompt's tokens and
    per-token iterations are those of decoding it alone; every prompt finishes once."""
    crit = {"residual": None, "kl": fpsolve.OutputKL(lambda h: lm.coda(h), tol=1e-5), "depth": fpsolve.Depth(3)}
    kw = dict(max_new_tokens=new, rtol=1e-6, max_iter=200, criterion=crit[criterion], warm_start=warm)
    out = decode(lm, prompts, slots=slots, check_every=every, **kw)
    for p, g in zip(prompts, out):
        a = decode(lm, [p], slots=1, **kw)[0]
        assert (g.tokens, g.iterations, g.status, g.finish) == (a.tokens, a.iterations, a.status, a.finish)
        assert len(g.tokens) == len(g.iterations) == len(g.status) <= new
        if criterion == "depth":
            assert set(g.iterations) <= {3}


def test_sampling_follows_the_softmax_and_each_key_alone():
    """pick_tokens draws from softmax(logits / T) (frequencies over 40,000 keys within 4 standard
    errors) and a row's token depends only on (seed, prompt, position)."""
    from fpsolve._generate import pick_tokens
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(40000, 4)
    for T in (1.0, 0.5, 3.0):
        p = torch.softmax(logits[0] / T, -1)
        t = pick_tokens(logits, T, 11, list(range(40000)), [3] * 40000)
        freq = torch.bincount(t, minlength=4) / 40000.0
        assert ((freq - p).abs() <= 4 * (p * (1 - p) / 40000).sqrt() + 1e-9).all(), (T, freq, p)
    rows = pick_tokens(logits[:7], 1.0, 11, [5, 1, 9, 0, 2, 8, 4], [3, 4, 5, 6, 7, 8, 9])
    alone = [int(pick_tokens(logits[:1], 1.0, 11, [i], [q])) for i, q in zip([5, 1, 9, 0, 2, 8, 4], range(3, 10))]
    assert rows.tolist() == alone
    assert pick_tokens(logits[:3], 0.0, 11, [0, 1, 2], [0, 0, 0]).tolist() == [2, 2, 2]


def test_the_prefill_stream_gives_each_prompt_its_own_joint_solve(lm):
    """Prompts of several lengths through the prefill stream, 2 in flight (padded to the longest):
    each prompt's iterations, status, cached keys and last state are those of its prefill alone,
    and the stream runs at most sum(iterations) / slots + max(iterations) + a window of passes."""
    from fpsolve._generate import Prefill
    from fpsolve._options import SOLVE_DEFAULTS, Options
    opts = Options.make("t", SOLVE_DEFAULTS, {"rtol": 1e-10, "max_iter": 300, "backward": "none", "check_every": 3})
    prompts = [torch.tensor(p) for p in MANY]
    calls = [0]
    core = lm.core

    def counted(h, e, cache=None):
        calls[0] += 1
        return core(h, e, cache)

    def run(ps, slots):
        pre, out = Prefill(lm, ps, opts, slots), {}
        with torch.no_grad():
            while (got := pre.next()) is not None:
                index, its, codes, kv, lengths, last = got
                for j, i in enumerate(index):
                    out[int(i)] = (int(its[j]), int(codes[j]), kv[0][0][j, :, :lengths[j]], last[j])
        return out
    lm.core = counted
    try:
        together = run(prompts, 2)
        passes = calls[0]
    finally:
        del lm.core
    assert sorted(together) == list(range(len(prompts)))
    for i, p in enumerate(prompts):
        its, code, k, last = run([p], 1)[0]
        assert (together[i][0], together[i][1]) == (its, code) and code == int(Status.CONVERGED)
        torch.testing.assert_close(together[i][2], k, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together[i][3], last, rtol=1e-9, atol=1e-12)
    its = [together[i][0] for i in together]
    assert passes <= sum(its) / 2 + max(its) + 3


def test_the_sampling_hash_is_splitmix64():
    """The uniforms come from SplitMix64's finaliser (its first output from state 0 is
    0xE220A8397B1DCDAF), bit for bit in int64 arithmetic."""
    from fpsolve._generate import _mix
    want = 0xE220A8397B1DCDAF - (1 << 64)
    assert int(_mix(torch.tensor([0]))) == want
