"""Looped language models (issue 21, first part): LoopedLM's joint solve and `generate`'s
token-by-token decoding against a cache of converged keys and values."""
from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve import Status

F64 = torch.float64
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [3]]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return fpsolve.LoopedLM(vocab_size=11, width=32, heads=4, core_layers=2, max_len=24).double().eval()


def decode(lm, prompts, **kw):
    kw = {"max_new_tokens": 6, "rtol": 1e-10, "max_iter": 300, **kw}
    return list(fpsolve.generate(lm, prompts, **kw))


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
    assert [g.index for g in decode(lm, PROMPTS, slots=3)] == [0, 1, 2, 3]


def test_the_cache_holds_one_entry_per_position_and_layer(lm):
    g = fpsolve._generate._Group(lm, [torch.tensor(PROMPTS[0])], 0, fpsolve._options.Options.make(
        "t", fpsolve._options.SOLVE_DEFAULTS, {"rtol": 1e-10, "max_iter": 300, "backward": "none"}),
        True, 0.0, None)
    out = list(g.run(5, None))[0]
    assert int(g.lengths[0]) == len(PROMPTS[0]) + len(out.tokens) - 1   # the last token's state is not solved
    assert len(g.cache) == len(lm.core_layers)


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
