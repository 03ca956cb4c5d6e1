"""Put the demo's fresh output into the documents that quote it (README.md, docs/visualizer.md).

Run by ``make docs`` after the pictures: the quoted text and the pictures then come from the same
run. ``tests/test_viz_truth.py`` checks the quotes against a fresh run.
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
from pathlib import Path

from graphengine.viz.demo import DemoConfig, vanishing_demo

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/visualizer.md")
QUOTE = re.compile(r"(It prints \(seed 0\):\n\n```\n)(.*?)(```)", re.S)


def fresh_output() -> str:
    """The demo's printout from its table to the list of files written (paths and timings vary)."""
    stream = io.StringIO()
    with tempfile.TemporaryDirectory() as out:
        vanishing_demo(Path(out), DemoConfig(), progress=False, stream=stream)
    printed = stream.getvalue()
    return printed[printed.index("final training loss"):printed.index("\n\nwrote ")] + "\n"


def main() -> int:
    quote = fresh_output()
    for name in DOCUMENTS:
        path = ROOT / name
        text, count = QUOTE.subn(lambda m: m.group(1) + quote + m.group(3), path.read_text())
        if count != 1:
            print(f"{name}: expected one quoted demo output, found {count}", file=sys.stderr)
            return 1
        path.write_text(text)
        print(f"updated the demo output quoted in {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
