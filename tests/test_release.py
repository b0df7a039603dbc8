"""Release hygiene: `python -m build` makes an sdist and a wheel whose metadata is complete, and
the wheel installed into a fresh virtual environment runs the README's first example.

The fresh environment gets fpsolve from the wheel only (`pip install --no-deps --no-index`);
torch, numpy and scipy come from this interpreter's site-packages through a .pth file, so the
test needs no network and no second copy of torch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import fpsolve
from test_docs import output_matches, python_blocks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the build tool is not installed: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, cwd=out, timeout=600)
    assert proc.returncode == 0, f"python -m build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {dist}, found {found}"
    return found[0]


def test_build_makes_an_sdist_and_a_wheel_with_one_version(dist: Path) -> None:
    version = fpsolve.__version__
    wheel = _one(dist, f"fpsolve-{version}-py3-none-any.whl")
    sdist = _one(dist, f"fpsolve-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(f"fpsolve-{version}.dist-info/METADATA").decode())
    assert "fpsolve/py.typed" in names and "fpsolve/solvers/__init__.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert meta["Version"] == version and meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] and meta.get_all("Classifier") and meta["Keywords"]
    assert any(r.startswith("torch") for r in meta.get_all("Requires-Dist"))
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "fpsolve/__init__.py"} <= members


def test_the_citation_and_the_changelog_name_the_current_version() -> None:
    version = fpsolve.__version__
    assert re.search(rf"^version: {re.escape(version)}$", (ROOT / "CITATION.cff").read_text(), re.M)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{version}] - " in changelog
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_the_wheel_in_a_fresh_venv_runs_the_readme_example(dist: Path, tmp_path: Path) -> None:
    wheel = _one(dist, f"fpsolve-{fpsolve.__version__}-py3-none-any.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch, numpy, scipy from this environment, after the venv's own packages
    Path(site, "zz_outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    example = python_blocks((ROOT / "README.md").read_text())[0]
    assert example.expected is not None, "the README's first example shows no output"
    code = "import fpsolve, json, sys; print(json.dumps(fpsolve.__file__))\n" + example.code
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, out = proc.stdout.split("\n", 1)
    assert json.loads(first).startswith(str(venv)), f"fpsolve imported from {first}, not the wheel"
    assert output_matches(example.expected, out), f"printed\n{out}\nREADME shows\n{example.expected}"
