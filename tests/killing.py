"""Run Python code in a child process and SIGKILL it at a moment the child marks itself."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def kill_when_ready(code: str, ready: pathlib.Path, delay: float = 0.0,
                    timeout: float = 120.0) -> None:
    """Start ``python -c code`` in the repository root, wait until it creates the file
    ``ready`` (then ``delay`` seconds more), and kill it with SIGKILL: no cleanup runs."""
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), f"the child never got ready (exit status {child.poll()})"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
