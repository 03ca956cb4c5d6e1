"""The ``graphengine`` command. Its subcommands come from plugins (the
``graphengine_register_commands`` hook); ``graphengine plugins`` lists them all."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from .errors import PluginError
from .hooks import Entry, PluginWarning, get_plugin_manager


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a subcommand per command registered now."""
    parser = argparse.ArgumentParser(
        prog="graphengine", description="The graphengine command line.",
        epilog="Commands come from plugins: `graphengine plugins` lists what each plugin "
               "registered, and the plugins disabled or failed to load.")
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in get_plugin_manager().commands.entries():
        command = entry.obj
        p = sub.add_parser(entry.name, help=command.help, description=command.help)
        p.set_defaults(run=command.run)
        _configure(entry, p)
    return parser


def _configure(entry: Entry, parser: argparse.ArgumentParser) -> None:
    """Let the command add its options; a command whose ``configure`` fails reports that when
    run, and the others keep working (GRAPHENGINE_STRICT_PLUGINS=1 makes it fatal)."""
    try:
        entry.obj.configure(parser)
    except Exception as exc:
        message = (f"command {entry.name!r} from {entry.origin()} failed to set up its options: "
                   f"{type(exc).__name__}: {exc}")
        if os.environ.get("GRAPHENGINE_STRICT_PLUGINS") == "1":
            raise PluginError(message) from exc
        warnings.warn(message + "; the other commands keep working", PluginWarning, stacklevel=3)

        def broken(args: argparse.Namespace) -> int:
            print(f"graphengine {entry.name}: {message}", file=sys.stderr)
            return 1

        parser.set_defaults(run=broken)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `graphengine plugins | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
