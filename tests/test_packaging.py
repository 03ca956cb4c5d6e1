"""CI checks the wheel, not only the editable install: `.ci/run` runs `make test`, which runs
tests/packaging/wheel_check.py (build, fresh venv, a project with its own plugins/ and viz/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(makefile: str, target: str) -> list[str]:
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.M)
    assert match, f"no target {target!r}"
    return [line.strip() for line in match[1].splitlines()]


def test_ci_runs_make_test_and_make_test_checks_the_wheel():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "$(MAKE) --no-print-directory wheel-check" in _recipe(makefile, "test")
    assert _recipe(makefile, "wheel-check") == ["$(BIN)/python tests/packaging/wheel_check.py"]
    assert (ROOT / "tests" / "packaging" / "wheel_check.py").is_file()
