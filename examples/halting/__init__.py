"""The halting study: halting as root-finding on a looped transformer, fixed-point halting vs
fixed depth vs ACT. Run it with `python examples/halting_study.py [--quick]`.

The task (examples/maze.py): reachability on grid mazes, cells as tokens, attention to a cell
and its 4 neighbours, so a sample's BFS depth d lower-bounds the passes a model needs. The
model: `fpsolve.LoopedTransformerBlock` (pre-norm, input injected at every pass, residual
scale 0.2, state normalised each pass) looped with shared weights, trained on 8x8 mazes with
d <= 12 and tested on 8x8 and 16x16 mazes (d up to ~48) for depth extrapolation.

Training uses unrolled gradients through every pass with a per-sample deep supervision from
pass max(d, 1) on (the first pass at which the answer can be known), plus a fixed-point
penalty on the relative step at every pass after that. The ACT baseline is a halt head on the
frozen trunk; a second head, act_train_only, is trained and tuned on the training
distribution only (8x8, d <= 12), as TRM and HRM train theirs. Every rule is evaluated on the
same trained weights and the same test set; then fpsolve.diagnose with and without the task's
check, and (full run) the ablations.

Modules:
  task         sizes, difficulty buckets, the QUICK and FULL configurations, recipes, ablations
  supervision  the deep-supervision loss (also used by examples/hierarchical.py)
  training     the trunk, the ACT halt head (`ActHead`) and its training
  rules        the plain run and every halting rule (through fpsolve's criteria where one fits)
  metrics      per-rule measures and diagnose summaries
  evaluation   every rule setting on the test sets, operating points, fpsolve.diagnose runs
  report       the printed table and docs/halting.json
  figures      docs/figures/halting_*.png
  main         units, worker processes, the command line
"""
