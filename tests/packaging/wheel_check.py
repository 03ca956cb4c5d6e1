"""Build the wheel, install it into a fresh virtual environment, and use it from a folder that
has its own ``plugins/`` and ``viz/`` packages, as a user's project may.

The editable install that ``make`` uses imports from the source tree, so it cannot show what a
wheel installs. Run by ``make wheel-check`` (and so by ``make test``) with the interpreter of the
project's virtual environment::

    .venv/bin/python tests/packaging/wheel_check.py

It works offline: the wheel is built from a clean copy of the tree (so a stale ``build/`` or
``*.egg-info`` of the checkout cannot leak old files into it) with the setuptools already
installed, and the fresh environment reaches the dependencies already installed in the running
environment through a ``.pth`` file naming a folder of links to them, graphengine's own
distributions left out. Exits 0 when every check passes, 1 with the reasons otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Where each folder of the source tree lands inside the wheel (pyproject's package-dir).
PACKAGE_DIRS = {"graphengine": "graphengine", "plugins": "graphengine/plugins", "viz": "graphengine/viz"}
#: Not part of a clean checkout: build leftovers, environments, caches.
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".ruff_cache", ".hypothesis", "demo_output")
#: Installed by the project's own environment, and so never visible to the fresh one.
OWN_DISTRIBUTIONS = ("graphengine", "__editable__")

#: Run from the user's project folder by the fresh environment's interpreter.
USER_SCRIPT = """
import warnings

warnings.simplefilter("error")  # a plugin that fails to load warns: make that fail the check

import numpy as np

import graphengine as ge
from graphengine import viz

import plugins
import viz as user_viz

assert plugins.OWNER == "user" and user_viz.OWNER == "user", "the user's packages were shadowed"
assert viz.__name__ == "graphengine.viz" and hasattr(viz, "render"), viz
g = ge.Graph()
x = g.input("x", shape=(None, 3))
out = g.activation("relu", g.layer("dense", x, units=2))
prediction = g.compile(outputs=[out]).predict({"x": np.ones((4, 3), np.float32)})
assert prediction.shape == (4, 2), prediction.shape
print("graphengine from", ge.__file__)
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="graphengine-wheel-") as tmp:
        work = Path(tmp)
        problems: list[str] = []
        try:
            wheel = build_wheel(work)
            problems += wheel_problems(wheel, work / "src")
            python = fresh_environment(work / "venv", wheel, work / "deps")
            problems += use_from_a_user_project(python, work / "project")
        except subprocess.CalledProcessError as exc:
            problems += [f"{' '.join(map(str, exc.cmd))} exited {exc.returncode}:\n"
                        f"{exc.stdout or ''}{exc.stderr or ''}"]
    for problem in problems:
        print(f"wheel check: {problem}", file=sys.stderr)
    if not problems:
        print(f"wheel check: {wheel.name} installs and works from a project with its own "
              f"plugins/ and viz/")
    return 1 if problems else 0


def run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return done.stdout


def build_wheel(work: Path) -> Path:
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED, symlinks=True)
    # Offline with the setuptools already here; a fresh machine's environment may lack it
    # (Python 3.12 venvs come without), and then pip fetches it into an isolated build.
    offline = ["--no-build-isolation"] if _has_setuptools() else []
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline, "-w", work / "dist", source)
    (wheel,) = (work / "dist").glob("graphengine-*.whl")
    return wheel


def _has_setuptools() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version
    return int(version("setuptools").split(".")[0]) >= 77


def wheel_problems(wheel: Path, source: Path) -> list[str]:
    """What the wheel holds besides the source tree's packages, placed as package-dir says."""
    with zipfile.ZipFile(wheel) as archive:
        held = {n for n in archive.namelist() if ".dist-info/" not in n}
    expected = {f"{inside}/{path.relative_to(source / folder).as_posix()}"
                for folder, inside in PACKAGE_DIRS.items()
                for path in (source / folder).rglob("*.py")}
    problems = []
    if stray := sorted(held - expected):
        problems.append(f"the wheel holds files that are not in the source tree's packages: {stray}")
    if missing := sorted(expected - held):
        problems.append(f"the wheel lacks source files: {missing}")
    return problems


def fresh_environment(venv: Path, wheel: Path, deps: Path) -> Path:
    """A new virtual environment holding the wheel, its dependencies linked from this one."""
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    deps.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for item in Path(folder).iterdir():
            own = item.name.lower().startswith(OWN_DISTRIBUTIONS)
            if not own and item.suffix != ".pth" and not (deps / item.name).exists():
                (deps / item.name).symlink_to(item)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "_graphengine_check_deps.pth").write_text(f"{deps}\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
        wheel)
    return python


def use_from_a_user_project(python: Path, project: Path) -> list[str]:
    for package in ("plugins", "viz"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text('OWNER = "user"\n')
        (project / package / "activations.py").write_text('OWNER = "user"\n')
    (project / "train.py").write_text(textwrap.dedent(USER_SCRIPT))
    problems = []
    where = run(python, "train.py", cwd=project)
    if str(python.parents[1]) not in where:
        problems.append(f"graphengine was not imported from the fresh environment: {where.strip()}")
    listing = run(python.parent / "graphengine", "plugins", cwd=project)
    for expected in ("layers: dense", "commands: render, demo", "activations: identity"):
        if expected not in listing:
            problems.append(f"`graphengine plugins` lacks {expected!r}:\n{listing}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
