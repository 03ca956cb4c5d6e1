"""The ``graphengine`` command. Its subcommands come from plugins (the
``graphengine_register_commands`` hook); ``graphengine plugins`` lists them all.

A user's mistake (a file that cannot be read, an argument graphengine refuses) is one line on
stderr, ``graphengine COMMAND: what went wrong``, and exit status 2, whichever plugin's command
ran into it: commands raise :class:`~graphengine.errors.GraphEngineError` (or let ``OSError``
through) and leave the reporting to :func:`main`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from . import __version__
from .errors import GraphEngineError, PluginError
from .hooks import Entry, PluginWarning, get_plugin_manager

#: The exit status of a user error, as argparse gives for a bad command line.
USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a subcommand per command registered now."""
    parser = argparse.ArgumentParser(
        prog="graphengine",
        description="The command line of graphengine, a deep-learning engine on a static "
                    "computation graph with a gradient-flow visualizer. Each command below comes "
                    "from an installed plugin (`graphengine plugins` is graphengine's own).",
        epilog="Commands come from plugins: `graphengine plugins` lists what each plugin "
               "registered, and the plugins disabled or failed to load. `graphengine COMMAND "
               "--help` shows a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print graphengine's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
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


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (``--epochs``): a whole number of at least 1, else a
    usage error naming the option, not a traceback later."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `graphengine plugins | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (GraphEngineError, OSError) as exc:
        print(f"graphengine {args.command}: {_user_message(exc)}", file=sys.stderr)
        return USAGE_ERROR


def _user_message(exc: BaseException) -> str:
    """The line a user reads: OSError's own text is ``[Errno 2] No such file...: 'x'``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
