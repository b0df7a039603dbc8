"""The code blocks of docs/training.md's newer sections run as shown (each in a fresh namespace,
in a temporary directory), and what they print or write is what the text says."""
from __future__ import annotations

import csv
import pathlib
import re

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = pathlib.Path(__file__).parents[1] / "docs" / "training.md"


def blocks(heading: str) -> list[str]:
    """The ```python blocks of the `## heading` section."""
    text = DOC.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    body = next(s for s in sections if s.startswith(heading))
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def run(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_block"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_the_csv_logging_block_runs(tmp_path, monkeypatch):
    (code,) = blocks("Monitoring convergence")
    run(code, tmp_path, monkeypatch)
    rows = list(csv.DictReader(open(tmp_path / "deq_stats.csv")))
    assert len(rows) == 20
    for key in ("iterations_mean", "converged_fraction", "residual_max", "adjoint_iterations_mean",
                "adjoint_converged_fraction", "evaluations"):
        assert all(float(r[key]) >= 0 for r in rows), key
    assert float(rows[-1]["converged_fraction"]) == 1.0


def test_the_norm_control_block_runs_and_shows_the_effect(tmp_path, monkeypatch, capsys):
    """The numbers in the table under it: the unbounded block needs far more passes."""
    (code,) = blocks("Keeping the block contractive")[-1:]
    ns = run(code, tmp_path, monkeypatch)
    r = ns["results"]   # name -> (iterations first, last, max, converged, sigma, loss)
    none = r["none"]
    assert none[1] > 40 and none[3] < 0.8 and none[4] > 2
    for name, v in r.items():
        if name != "none":
            assert v[1] < 10 and v[3] == 1.0 and v[4] <= 0.9 * 1.01, (name, v)
    assert r["spectral_bound(0.9)"][4] == pytest.approx(0.9, rel=0.01)
    assert len(capsys.readouterr().out.splitlines()) == 4
