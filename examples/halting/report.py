"""What the study reports: the printed table and diagnose lines, and docs/halting.json
(per-rule means and spreads over seeds, the sweeps, diagnose by source, the ablations)."""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from .metrics import FLAG_RATES, flag_rates, mean_spread, summarize_diagnose
from .task import BUCKETS, LOOSE_L2_RTOL, RECIPE_LABELS, Config, bucket_name


def named_rules(ev: dict, cfg: Config) -> Dict[str, dict]:
    """The operating points the table names (chosen before looking: rtol, tau; K the best)."""
    r, c = ev["results"], ev["chosen"]
    K = ev["best_fixed_depth"]["depth"]
    return {
        f"fixed_depth (K={K}, best)": r[("fixed_depth", K)],
        f"act (tau={c['act']:g})": r[("act", c["act"])],
        **({f"act_train_only (tau={c['act_train_only']:g})": r[("act_train_only", c["act_train_only"])]}
           if "act_train_only" in c else {}),
        f"fixed_point (inf, {c['fixed_point_inf']:g})": r[("fixed_point_inf", c["fixed_point_inf"])],
        f"fixed_point_l2 ({c['fixed_point_l2']:g})": r[("fixed_point_l2", c["fixed_point_l2"])],
        f"anderson (inf, {c['anderson_inf']:g})": r[("anderson_inf", c["anderson_inf"])],
        f"fixed_point_corrected ({c['fixed_point_corrected']:g})":
            r[("fixed_point_corrected", c["fixed_point_corrected"])],
    }


def print_table(rules: Dict[str, dict]) -> str:
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    lines = [f"{'rule':28s} {'acc':>6s} {'passes':>7s} {'rho_all':>7s} {'rho_in':>7s} {'prem%':>6s} {'sw%':>6s} "
             f"{'acc>12':>6s} {'pas>12':>6s} {'sw>12%':>6s} {'uns>12%':>7s}  "
             + "acc/overshoot by difficulty " + " ".join(f"{n:>9s}" for n in names)]
    for name, m in rules.items():
        cells = []
        for b in names:
            if b in m["accuracy_by_bucket"]:
                cells.append(f"{m['accuracy_by_bucket'][b]:.2f}/{m['median_overshoot_correct'][b]:+.0f}".rjust(9))
            else:
                cells.append(" " * 9)
        lines.append(f"{name:28s} {m['accuracy']:6.3f} {m['mean_passes']:7.1f} {m['spearman_difficulty']:7.2f} "
                     f"{m['spearman_in_distribution']:7.2f} {100 * m['premature_halt_rate']:6.2f} "
                     f"{100 * m['settled_wrong_rate']:6.2f} {m['accuracy_harder_than_training']:6.3f} "
                     f"{m['mean_passes_harder_than_training']:6.1f} "
                     f"{100 * m['settled_wrong_rate_harder_than_training']:6.2f} "
                     f"{100 * m['unsettled_rate_harder_than_training']:7.2f}  {'':27s} " + " ".join(cells))
    return "\n".join(lines)


def fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{100 * v:.1f}%"


def print_results(by_recipe: Dict[str, List[dict]], ablation: dict, cfg: Config) -> None:
    """Per recipe and seed: the headline, the table of named rules, diagnose per source; then
    the ablations' flag rates."""
    for recipe, outs in by_recipe.items():
        for o in outs:
            ev = o["eval"]
            print(f"\n[{RECIPE_LABELS[recipe]}] seed {o['unit'].seed}: trained loss {o['final_loss']:.4f}; accuracy after "
                  f"{cfg.max_passes} passes on mazes harder than training {ev['hard_accuracy_at_max']:.3f} -> "
                  f"{'extrapolated' if o['extrapolated'] else 'did NOT extrapolate'}; best fixed depth "
                  f"K={ev['best_fixed_depth']['depth']} acc {ev['best_fixed_depth']['accuracy']:.3f}")
            print(print_table(named_rules(ev, cfg)))
            for label, rows in [("trained model", o["rows"])] + list(o["probe_rows"].items()):
                dg = summarize_diagnose(rows)
                print(f"diagnose, {label} ({dg['samples']} samples; {dg['settled_wrong']} settled-but-wrong, "
                      f"{dg['settled_correct']} settled-and-correct): internal flags catch {fmt(dg['settled_wrong_recall'])}"
                      f" of false halts, fire on {fmt(dg['false_alarm_rate'])} of settled-and-correct; with check=: "
                      f"catch {fmt(dg['check_recall'])}, false alarms {fmt(dg['check_false_alarm_rate'])}; "
                      f"flags {dg['flag_counts']}")
    if ablation:
        print("\nablation (diagnose flags, % of samples, mean over seeds):")
        for name, a in ablation.items():
            print(f"  {name:18s} " + " ".join(f"{k.replace('_rate', '')} {100 * a[k]:5.1f}"
                                              for k in list(FLAG_RATES) + ["healthy_rate", "accuracy"])
                  + f"  extrapolated {a['extrapolated_seeds']}/{len(a['per_seed'])}")


def summarize_ablation(results: List[dict], cfg: Config) -> dict:
    """Per ablation (and the main model under the same protocol): flag rates, mean and spread
    over seeds, and per seed whether fixed-point halting extrapolated (>= 0.95 on d > 12)."""
    if not cfg.ablations:
        return {}
    per = {"main": [(o["unit"].seed, o["ablation_rows"]) for o in results
                    if o["unit"].variant == "main" and o["unit"].recipe == "difficulty"]}
    for name in cfg.ablations:
        per[name] = [(o["unit"].seed, o["rows"]) for o in results if o["unit"].variant == name]
    out = {}
    for name, seeds in per.items():
        rates = [flag_rates(rows) for _, rows in seeds]
        entry = {k: mean_spread([r[k] for r in rates])[0] for k in rates[0]}
        entry["spread"] = {k: mean_spread([r[k] for r in rates])[1] for k in rates[0]}
        entry["per_seed"] = [{"seed": seed, **r, "extrapolated": bool(r["accuracy_harder_than_training"] >= 0.95)}
                             for (seed, _), r in zip(seeds, rates)]
        entry["extrapolated_seeds"] = sum(r["extrapolated"] for r in entry["per_seed"])
        out[name] = entry
    return out


def summarize_rules(outs: List[dict], cfg: Config) -> dict:
    """Per rule at its operating point: the mean over the given seeds, the spread under 'spread'."""
    rule_names = list(named_rules(outs[0]["eval"], cfg))
    rules = {}
    for i, name in enumerate(rule_names):
        ms = [list(named_rules(o["eval"], cfg).values())[i] for o in outs]
        entry, spread = {}, {}
        keys = ["accuracy", "mean_passes", "spearman_difficulty", "spearman_in_distribution",
                "premature_halt_rate", "settled_wrong_rate"]
        keys += [k for k in ms[0] if k.endswith(("_harder_than_training", "_8x8", "_16x16"))]
        for k in keys:
            entry[k], spread[k] = mean_spread([m[k] for m in ms])
        for k in ("median_overshoot_correct", "accuracy_by_bucket", "premature_by_bucket"):
            entry[k] = {b: mean_spread([m[k].get(b, float("nan")) for m in ms])[0] for b in ms[0][k]}
        entry["settled_correct_table"] = {k: int(sum(m["settled_correct_table"][k] for m in ms))
                                          for k in ms[0]["settled_correct_table"]}
        entry["spread"] = spread
        entry["per_seed_accuracy"] = [m["accuracy"] for m in ms]
        entry["per_seed"] = {k: [m[k] for m in ms] for k in keys}
        entry["operating_point_per_seed"] = [list(named_rules(o["eval"], cfg))[i] for o in outs]
        rules[name.split(" ")[0]] = entry
    return rules


def summarize_recipe(outs: List[dict], cfg: Config) -> dict:
    """One recipe's rules (mean over seeds, spread under 'spread'; also over the seeds that
    extrapolated only), sweeps and per-seed facts."""
    rules = summarize_rules(outs, cfg)
    good = [o for o in outs if o["extrapolated"]]
    sweeps: Dict[str, list] = {}
    for key in outs[0]["eval"]["results"]:
        acc = [o["eval"]["results"][key]["accuracy"] for o in outs]
        passes = [o["eval"]["results"][key]["mean_passes"] for o in outs]
        sweeps.setdefault(key[0], []).append({"setting": key[1], "accuracy": mean_spread(acc)[0],
                                              "mean_passes": mean_spread(passes)[0],
                                              "per_seed_accuracy": acc, "per_seed_mean_passes": passes})
    bests = [o["eval"]["best_fixed_depth"] for o in outs]
    return {
        "rules": rules,
        "rules_extrapolated_seeds": summarize_rules(good, cfg) if good and len(good) < len(outs) else None,
        "sweeps": sweeps,
        "best_fixed_depth": {"depth": int(round(np.mean([b["depth"] for b in bests]))),
                             "accuracy": float(np.mean([b["accuracy"] for b in bests])), "per_seed": bests},
        "extrapolated_seeds": int(sum(o["extrapolated"] for o in outs)),
        "per_seed": [{"seed": o["unit"].seed, "extrapolated": o["extrapolated"], "final_loss": o["final_loss"],
                      "hard_accuracy_at_max_passes": o["eval"]["hard_accuracy_at_max"],
                      "operating_points": o["eval"]["chosen"],
                      "diagnose_trained": summarize_diagnose(o["rows"]),
                      "diagnose_probes": {k: summarize_diagnose(v) for k, v in o["probe_rows"].items()}}
                     for o in outs],
    }


def diagnose_sources(by_recipe: Dict[str, List[dict]], results: List[dict]) -> Dict[str, list]:
    """diagnose's rows pooled per source of settled states: the trained models per recipe, the
    part-trained snapshots, the loose l2 criterion, the ablations (empty sources left out)."""
    mains = [o for o in results if o["unit"].variant == "main"]
    sources = {f"trained, {RECIPE_LABELS[r]}": sum((o["rows"] for o in outs), []) for r, outs in by_recipe.items()}
    for prefix, name in (("snapshot", "part-trained snapshots"), ("l2", f"l2 criterion at rtol {LOOSE_L2_RTOL:g}")):
        sources[name] = sum((v for o in mains for k, v in o["probe_rows"].items() if k.startswith(prefix)), [])
    sources["ablations"] = sum((o["rows"] for o in results if o["unit"].variant != "main"), [])
    return {k: v for k, v in sources.items() if v}


def build_json(by_recipe: Dict[str, List[dict]], results: List[dict], ablation: dict, cfg: Config,
               runtime: float, quick: bool) -> dict:
    """docs/halting.json: the top level is the difficulty-supervised recipe (the issue's schema);
    'label_free' has the same fields for the label-free recipe; 'diagnose' pools every model."""
    sources = diagnose_sources(by_recipe, results)
    healthy = sum((o["rows"] for o in results if o["unit"].variant == "main" and o["extrapolated"]), [])
    dg_all = summarize_diagnose(sum(sources.values(), []))
    top = by_recipe.get("difficulty") or next(iter(by_recipe.values()))
    return {
        "task": "grid-maze reachability (examples/maze.py): train 8x8 with BFS depth <= 12; test 8x8 and 16x16 "
                f"(depth <= {cfg.max_test_difficulty}); {cfg.n_test[8]} + {cfg.n_test[16]} test mazes",
        "seeds": cfg.seeds,
        "quick": quick,
        "runtime_seconds": runtime,
        "max_passes": cfg.max_passes,
        "recipe": RECIPE_LABELS[top[0]["unit"].recipe],
        **summarize_recipe(top, cfg),
        **({"label_free": {"recipe": RECIPE_LABELS["fixed_passes"], **summarize_recipe(by_recipe["fixed_passes"], cfg)}}
           if by_recipe.get("fixed_passes") and top is not by_recipe["fixed_passes"] else {}),
        "diagnose": {
            **{k: dg_all[k] for k in ("settled_wrong_recall", "false_alarm_rate", "check_recall",
                                      "check_false_alarm_rate", "check_or_flags_recall", "samples",
                                      "settled_wrong", "settled_correct", "flag_counts")},
            "healthy_false_alarm_rate": summarize_diagnose(healthy)["false_alarm_rate"] if healthy else None,
            "by_source": {k: summarize_diagnose(v) for k, v in sources.items()},
        },
        "ablation": ablation,
    }


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(w) for w in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return jsonable(v.item())
    return v
