"""The ``graphengine`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from .plugins import get_plugin_manager

#: Subcommands: name -> (configure parser, run). Other modules add theirs with `command`.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    def decorate(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (configure, run)
        return run
    return decorate


def _plugins_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("plugins", _plugins_args)
def plugins_command(args: argparse.Namespace) -> int:
    """List installed plugins, what each registered, and any load errors."""
    report = get_plugin_manager().report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for plugin in report:
        origin = plugin["distribution"] or "-"
        version = f" {plugin['version']}" if plugin["version"] else ""
        state = " [disabled]" if plugin["disabled"] else (" [ERROR]" if plugin["error"] else "")
        print(f"{plugin['name']}  ({origin}{version}){state}")
        for kind, names in sorted(plugin["registered"].items()):
            print(f"    {kind}: {', '.join(names)}")
        if plugin["error"]:
            print(f"    error: {plugin['error']}")
    return 0


def _load_subcommand_modules() -> None:
    # Subcommands living outside the core (the visualizer's) register themselves on import;
    # the core does not depend on them, so a missing one only drops its commands.
    try:
        import viz.cli  # noqa: F401
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    _load_subcommand_modules()
    parser = argparse.ArgumentParser(prog="graphengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, run) in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        configure(p)
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `graphengine plugins | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
