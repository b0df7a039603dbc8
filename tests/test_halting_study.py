"""The halting study's own measuring code (examples/halting/): K_sat, the replayed rules, the
per-bucket metrics, AUROC and the diagnose summaries, on hand-made runs whose answers are
known; the replayed step rule against fpsolve's own iteration counts; the shared
deep-supervision loss."""
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import fpsolve

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from halting import main, metrics, report, rules, supervision, task, training  # noqa: E402
from maze import MazeLoop, generate  # noqa: E402


def hand_run() -> rules.PlainRun:
    """3 samples, passes 0..5. Sample 0: right from pass 2 on. Sample 1: right at pass 1,
    wrong at 2, right from 3 on. Sample 2: never right; its prediction changes at pass 4."""
    T = 5
    correct = torch.zeros(T + 1, 3, dtype=torch.bool)
    correct[2:, 0] = True
    correct[1, 1] = True
    correct[3:, 1] = True
    changed = torch.zeros(T + 1, 3, dtype=torch.bool)
    changed[:2, 0] = True          # the prediction settles after pass 2
    changed[:3, 1] = True          # ... after pass 3
    changed[:4, 2] = True          # ... after pass 4
    act = torch.full((T + 1, 3), -10.0)   # the head's logits: p = sigmoid(logit) about 0 ...
    act[1, 1] = 3.0                # ... p 0.95: the head fires too early on sample 1
    act[3, 0] = 1.4                # p 0.80
    # steps: r_t = ||z_(t+1) - z_t||, scale 1
    step = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.5, 1.0], [0.01, 0.5, 1.0], [1e-4, 0.01, 1.0], [1e-6, 1e-3, 0.1]])
    return rules.PlainRun(correct, changed, {"act": act}, {"inf": step, "l2": step}, {"inf": torch.ones_like(step),
                                                                          "l2": torch.ones_like(step)})


def test_k_sat_is_the_first_pass_of_the_final_prediction():
    assert rules.k_sat(hand_run()).tolist() == [2, 3, 4]


def test_fixed_depth_and_act_rules():
    run = hand_run()
    h = rules.fixed_depth(run, 2)
    assert h.passes.tolist() == [2, 2, 2] and h.correct.tolist() == [True, False, False]
    a = rules.act_rule(run, 0.9)                     # fires at pass 1 on sample 1 only
    assert a.passes.tolist() == [5, 1, 5] and a.correct.tolist() == [True, True, False]
    assert a.settled.tolist() == [False, True, False]


def test_step_rule_halts_at_the_first_small_step():
    h = rules.step_rule(hand_run(), 0.05, "inf")
    # sample 0: r_2 = 0.01 <= 0.05 -> halt after pass 3; sample 1: r_3 = 0.01 -> pass 4;
    # sample 2 never: budget
    assert h.passes.tolist() == [3, 4, 5] and h.settled.tolist() == [True, True, False]


def test_corrected_rule_waits_for_the_contraction_estimate():
    run = hand_run()
    h = rules.corrected_rule(run, 0.05, "inf")
    plain = rules.step_rule(run, 0.05, "inf")
    assert (h.passes >= plain.passes).all()
    # sample 0: ratios r1/r0 = 1, r2/r1 = 0.01, r3/r2 = 0.01: rho_2 = max(1, 0.01) = 1 -> capped 0.999
    # (no halt at pass 3), rho_3 = 0.01 -> r_3 / 0.99 <= 0.05: halt after pass 4
    assert h.passes[0].item() == 4


def test_metrics_overshoot_and_premature():
    run = hand_run()
    ks = rules.k_sat(run)
    d = torch.tensor([1, 2, 20])
    h = rules.act_rule(run, 0.9)
    m = metrics.metrics(h, ks, run.correct[-1], d)
    # sample 1 halted at pass 1 before K_sat = 3, right there: not premature (premature needs wrong)
    assert m["premature_halt_rate"] == 0.0
    h2 = rules.fixed_depth(run, 2)                   # sample 1 wrong at pass 2 and right later: premature
    m2 = metrics.metrics(h2, ks, run.correct[-1], d)
    assert m2["premature_halt_rate"] == pytest.approx(1 / 3)
    assert m2["median_overshoot_correct"]["0-3"] == 0.0      # sample 0: halt 2 - K_sat 2
    assert m2["accuracy_by_bucket"]["13-20"] == 0.0
    assert m2["settled_correct_table"]["settled_correct"] == 1


def test_auroc_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 60)
    pos[:5] = neg[:5]                                         # ties
    ref = sklearn_metrics.roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[pos, neg])
    assert metrics.auroc(list(pos), list(neg)) == pytest.approx(ref)
    assert np.isnan(metrics.auroc([], [1.0]))


def test_diagnose_summary_counts():
    sig = {"distance / tolerance": 1.0, "spectral radius": 0.5, "restart distance": 0.0}
    rows = [(True, False, {"FALSE_HALT"}, True, 3, sig), (True, False, set(), False, 20, sig),
            (True, True, set(), False, 5, sig), (True, True, {"PATH_DEPENDENCE"}, False, 30, sig),
            (False, False, {"DIVERGENCE"}, False, 40, sig)]
    s = metrics.summarize_diagnose(rows)
    assert (s["settled_wrong"], s["settled_correct"]) == (2, 2)
    assert s["settled_wrong_recall"] == 0.5 and s["false_alarm_rate"] == 0.5
    assert s["check_recall"] == 0.5 and s["check_false_alarm_rate"] == 0.0
    r = metrics.flag_rates(rows)
    assert r["divergence_rate"] == pytest.approx(0.2) and r["healthy_rate"] == pytest.approx(0.4)
    assert r["accuracy_harder_than_training"] == pytest.approx(1 / 3)


def test_replayed_step_rule_matches_fpsolve_iterations(one_thread):
    """The study replays fpsolve's criterion on the plain run for operating-point selection:
    the replay must give fpsolve's own iteration counts."""
    torch.manual_seed(0)
    model = MazeLoop(16, 2, residual_scale=1.0).eval()   # untrained: settles in 4-20 passes
    m = generate(24, 8, np.random.default_rng(0), max_difficulty=12)
    cells, labels, _ = task.as_tensors(m)
    head = training.ActHead(16)
    run = rules.plain_run(model, {"act": head}, cells, labels, 40)
    for rtol in (1e-2, 1e-4):
        replay = rules.step_rule(run, rtol, "inf")
        solved = rules.fpsolve_rule(model, cells, labels, "fixed_point", "inf", rtol, 40)
        assert solved.settled.all() and len(set(solved.passes.tolist())) > 1   # halts differ per sample
        agree = (replay.passes == solved.passes).float().mean().item()
        assert agree >= 0.95, (replay.passes.tolist(), solved.passes.tolist())


def test_act_rule_is_fpsolve_haltheads_check_at_every_pass(one_thread):
    """act_rule replays fpsolve.HaltHead on the logits the plain run recorded: the same halts as
    the criterion's own check on the states, pass by pass; and a run without heads (as
    benchmarks/train_maze_checkpoint.py makes) has the same steps."""
    torch.manual_seed(0)
    model = MazeLoop(16, 2).eval()
    cells, labels, _ = task.as_tensors(generate(12, 8, np.random.default_rng(1), max_difficulty=12))
    open_ = cells.flatten(1) > 0
    head = training.ActHead(16).eval()
    run = rules.plain_run(model, {"act": head}, cells, labels, 15)
    tau = float(torch.sigmoid(run.halt_logit["act"][1:].median()))     # fires on about half the passes
    criterion = fpsolve.HaltHead(lambda z: head(z, open_), threshold=tau)
    fired = []
    with torch.no_grad():
        x = model.inputs(cells)
        z = torch.zeros_like(x[0])
        for _ in range(15):
            z = model(z, x)
            fired.append(criterion.check(None, z, criterion.init(z, len(cells), z.device))[0])
    fired = torch.stack(fired)
    expect = torch.where(fired.any(0), fired.float().argmax(0) + 1, torch.full((len(cells),), 15))
    halts = rules.act_rule(run, tau)
    assert halts.passes.tolist() == expect.tolist() and halts.settled.tolist() == fired.any(0).tolist()
    assert 0 < int(fired.sum()) < fired.numel()
    bare = rules.plain_run(model, {}, cells, labels, 15)
    assert bare.halt_logit == {} and torch.equal(bare.step["inf"], run.step["inf"])
    assert torch.equal(bare.correct, run.correct)


class _Moving:
    """z_t = t x: every relative step is ||x||^2 / ||t x||^2 = 1 / t^2; the readout is 0
    (binary cross-entropy log 2 per cell)."""

    def __call__(self, z, x):
        return z + x

    def logits(self, z):
        return torch.zeros(z.shape[:2])


class _MovingPair(_Moving):
    """The same on a tuple state (both levels move alike)."""

    def __call__(self, z, x):
        return z[0] + x, z[1] + x

    def logits(self, z):
        return torch.zeros(z[0].shape[:2])


@pytest.mark.parametrize("model", [_Moving(), _MovingPair()])
def test_deep_supervision_loss_by_hand(model):
    """Per sample: log 2 at each pass from `first` on, 1/t^2 at each pass t > settle_from (t >= 2),
    over the supervised passes T + 1 - first; walls do not count."""
    x = torch.ones(2, 4, 3)
    z0 = (torch.zeros_like(x),) * 2 if isinstance(model, _MovingPair) else torch.zeros_like(x)
    open_ = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    labels = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])
    first, T, w = torch.tensor([1, 3]), 4, 0.1
    loss = supervision.deep_supervision_loss(model, z0, x, labels, open_, first, first, T, w)
    ln2 = float(np.log(2))
    per_sample = [(4 * ln2 + w * (1 / 4 + 1 / 9 + 1 / 16)) / 4, (2 * ln2 + w / 16) / 2]
    assert float(loss) == pytest.approx(np.mean(per_sample), rel=1e-6)


def test_hierarchical_trains_with_the_same_loss():
    import hierarchical
    assert hierarchical.deep_supervision_loss is supervision.deep_supervision_loss


def test_train_only_halt_head_sees_only_the_training_distribution(monkeypatch, one_thread):
    """act_train_only's pool holds 8x8 mazes with d <= 12 only (as TRM/HRM train their head);
    today's act pool holds 16x16 mazes and harder ones too."""
    pools = {}
    real = training.halt_pool_mazes

    def spy(cfg, seed, train_only=False):
        pools[train_only] = real(cfg, seed, train_only)
        return pools[train_only]

    monkeypatch.setattr(training, "halt_pool_mazes", spy)
    cfg = replace(task.QUICK, dim=16, act_steps=2, act_pool=(24, 8), max_passes=20)
    model = MazeLoop(16, 2).eval()
    for train_only in (False, True):
        training.train_halt_head(model, cfg, 0, train_only=train_only)
    assert {m.n for m in pools[True]} == {8} and sum(len(m) for m in pools[True]) == 32
    assert max(int(m.difficulty.max()) for m in pools[True]) <= task.TRAIN_MAX_DIFFICULTY
    assert 16 in {m.n for m in pools[False]}
    assert max(int(m.difficulty.max()) for m in pools[False]) > task.TRAIN_MAX_DIFFICULTY


def test_a_tiny_run_reports_both_act_heads_in_the_json(one_thread):
    """One unit of a shrunken quick run, through to the json: act_train_only is a rule beside
    act, with its tau chosen and its harder-than-training fields."""
    import json
    import queue
    cfg = replace(task.QUICK, dim=16, steps=4, act_steps=4, act_pool=(8, 4), n_test={8: 16, 16: 8},
                     n_val={8: 24, 16: 8}, n_diagnose={8: 4, 16: 4}, max_passes=20, rtols=(1e-2,),
                     anderson_rtols=(1e-2,), act_taus=(0.5, 0.9))
    rng = np.random.default_rng(0)
    tests = {n: generate(cfg.n_test[n], n, rng, max_difficulty=cfg.max_test_difficulty) for n in (8, 16)}
    val = {n: generate(cfg.n_val[n], n, rng, max_difficulty=cfg.max_test_difficulty) for n in (8, 16)}
    results = main.run_units([main.Unit("difficulty", "main", 0)], cfg, tests, val, 1, 1, main.QueueBar(queue.Queue()))
    out = json.loads(json.dumps(report.jsonable(report.build_json({"difficulty": results}, results, {}, cfg, 0.0, True))))
    assert {"act", "act_train_only"} <= set(out["rules"])
    assert out["per_seed"][0]["operating_points"]["act_train_only"] in cfg.act_taus
    rule = out["rules"]["act_train_only"]
    for k in ("accuracy_harder_than_training", "settled_wrong_rate_harder_than_training",
              "mean_passes_harder_than_training", "accuracy_8x8", "accuracy_16x16"):
        assert k in rule and k in rule["per_seed"]
    assert len(out["sweeps"]["act_train_only"]) == len(cfg.act_taus)
