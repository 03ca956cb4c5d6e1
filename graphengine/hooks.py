"""The plugin system: hook specifications, registries and entry-point loading.

Everything graphengine can build with (backends, layers, activations, losses, optimizers,
initializers), and the subcommands of the ``graphengine`` command line, come from a plugin, the
built-in ones included: they are registered through the entry-point group ``graphengine`` exactly
as a third-party package's are. Only the ``graphengine plugins`` command is the core's own.

A plugin is a module (or object) with functions marked ``@graphengine.hookimpl``::

    import graphengine as ge

    @ge.hookimpl
    def graphengine_register_activations(register):
        register("swish_beta", Swish)

and an entry point in its ``pyproject.toml``::

    [project.entry-points.graphengine]
    swish = "my_package.plugin"

Entry points are loaded once, lazily, on the first registry lookup.
``GRAPHENGINE_DISABLE_PLUGINS=name1,name2`` skips entry points by name before they are imported;
a plugin that fails to import or register is reported by ``graphengine plugins`` and the others
keep working, unless ``GRAPHENGINE_STRICT_PLUGINS=1`` makes such failures fatal.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from .errors import PluginConflictError, PluginError, UnknownNameError, did_you_mean

if TYPE_CHECKING:
    import argparse

PROJECT = "graphengine"
ENTRY_POINT_GROUP = "graphengine"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


class PluginWarning(UserWarning):
    """A plugin failed to load; the others keep working."""


class HookSpecs:
    """The hooks a plugin may implement. Each receives a ``register`` callback:

    ``register(name, obj, *, aliases=(), override=False)``

    ``name`` is what users write (``g.activation("swish", x)``); ``aliases`` are further names
    for the same object. Registering a name another plugin already registered is an error naming
    both plugins, unless ``override=True`` (then the later registration wins, deliberately).
    """

    @hookspec
    def graphengine_register_backends(self, register: Register) -> None:
        """Register array backends: subclasses of :class:`graphengine.Backend`.

        A backend class must answer ``unavailable_reason()`` without failing when its library
        or hardware is missing (return a sentence), so that listing plugins never crashes.
        """

    @hookspec
    def graphengine_register_layers(self, register: Register) -> None:
        """Register layers: subclasses of :class:`graphengine.Layer`.

        The class is instantiated with the user's keyword arguments and its ``build(g, *inputs)``
        adds parameters and operators to the graph inside the layer's name scope.

        A layer's own operators (``g.apply(op, *inputs)``) subclass :class:`graphengine.Operator`:
        ``forward(self, ctx, xp, *inputs)`` and ``backward(self, ctx, xp, inputs, output, grad)``.
        An operator is a description shared by every model and thread: whatever its forward keeps
        for its backward goes on ``ctx``, the context of that one call, never on ``self``; the
        run's mode and random generator are ``ctx.training`` and ``ctx.rng``.
        """

    @hookspec
    def graphengine_register_activations(self, register: Register) -> None:
        """Register activations: subclasses of :class:`graphengine.Activation` with
        ``forward(self, xp, x) -> y`` and ``backward(self, xp, x, y, dy) -> dx``."""

    @hookspec
    def graphengine_register_losses(self, register: Register) -> None:
        """Register losses: subclasses of :class:`graphengine.Loss` with
        ``forward(self, xp, pred, target) -> scalar`` (mean over the batch) and
        ``backward(self, xp, pred, target) -> dpred``."""

    @hookspec
    def graphengine_register_optimizers(self, register: Register) -> None:
        """Register optimizers: subclasses of :class:`graphengine.Optimizer`, constructed with
        their hyper-parameters, with ``init_state(self, xp, param) -> dict`` and
        ``update(self, xp, param, grad, state, step)`` updating ``param`` in place."""

    @hookspec
    def graphengine_register_initializers(self, register: Register) -> None:
        """Register parameter initializers: subclasses of :class:`graphengine.Initializer`,
        called as ``init(rng, shape, fan_in, fan_out) -> numpy.ndarray``."""

    @hookspec
    def graphengine_register_onnx_exporters(self, register: Register) -> None:
        """Register how operators of a kind are written to ONNX (``graphengine.onnx.export``):
        ``register(kind, exporter)``, where ``kind`` is the operator's ``kind`` (what
        ``node.kind`` says; for an activation, its registered name) and ``exporter(ex, node)``
        emits the ONNX nodes that compute ``node``:

        - ``ex.input(node, i)``: the ONNX value holding the node's ``i``-th input;
        - ``ex.value(node, i)`` / ``ex.weight(node, i, what)``: that input's array when it is a
          parameter or constant (``weight`` insists), to rearrange into ONNX's layout;
        - ``ex.constant(array)``, ``ex.ints(values)``: a new initializer, returning its name;
        - ``ex.add(op_type, inputs, output=None, *, outputs=1, **attributes)``: an ONNX node,
          returning its output's name(s); ``ex.opset`` is the opset being written.

        The exporter must give its last node the output ``node.name``, and reads its
        configuration from ``node.op`` (and shapes from ``node.shape``). Exporting a graph that
        holds a kind nobody mapped fails, naming the kind and its layer. Import ``onnx`` inside
        the exporter if at all, never at module level: ONNX is an optional dependency. An entry
        for a built-in kind is overridden by a plugin's, without ``override=True``.
        """

    @hookspec
    def graphengine_register_commands(self, register: Register) -> None:
        """Register subcommands of the ``graphengine`` command line (``graphengine render ...``).

        Called once, when the plugin is loaded, like the other hooks: not each time the command
        line runs. The callback here takes a command rather than a class:

        ``register(name, configure, run, *, help=None, override=False)``

        - ``name``: what the user types after ``graphengine``; no spaces, no leading ``-``.
        - ``configure(parser: argparse.ArgumentParser) -> None`` adds the command's arguments and
          options to its own parser. It runs each time the command line is built, for every
          command, so it should only add arguments.
        - ``run(args: argparse.Namespace) -> int`` does the work with the parsed arguments and
          returns the exit status (0 for success).
        - ``help``: the one line ``graphengine --help`` shows; by default the first line of
          ``run``'s docstring.

        Every program that looks up a registry imports the plugin's module, so keep its
        module-level imports light and import what the command needs inside ``run``. A name
        already registered (``plugins`` is the core's own command) is an error naming both
        plugins, unless ``override=True``.
        """


KINDS = ("backends", "layers", "activations", "losses", "optimizers", "initializers",
         "onnx_exporters", "commands")
#: "a loss", "a layer": how messages name one thing of a kind.
SINGULAR = {kind: kind[:-1] for kind in KINDS} | {"losses": "loss"}
#: The name the core's own contributions (the ``plugins`` command) are listed under.
CORE_PLUGIN = "graphengine"


@dataclass(frozen=True)
class Command:
    """A subcommand of the ``graphengine`` command line, as registered by a plugin (the
    registry of kind ``"commands"`` holds these)."""

    name: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str | None = None


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str
    distribution: str | None
    aliases: tuple[str, ...] = ()

    def origin(self) -> str:
        return f"plugin {self.plugin!r}" + (f" (distribution {self.distribution})"
                                            if self.distribution else "")


class Registry:
    """Names -> objects of one kind, each remembering which plugin registered it."""

    def __init__(self, kind: str, manager: PluginManager) -> None:
        self.kind = kind
        self._manager = manager
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry, override: bool) -> None:
        keys = (entry.name, *entry.aliases)
        for key in keys:  # all checked before any is added: a conflict registers nothing
            existing = self._entries.get(key)
            if existing is not None and existing.plugin != entry.plugin and not override:
                raise PluginConflictError(
                    f"{SINGULAR[self.kind]} {key!r} is registered twice: by {existing.origin()} and by "
                    f"{entry.origin()}; rename one, disable one with "
                    f"GRAPHENGINE_DISABLE_PLUGINS, or pass override=True to register()")
        for key in keys:
            self._entries[key] = entry

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        self._manager.load()
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            failed = sorted(r.name for r in self._manager.records.values() if r.error)
            hint = (f"plugin(s) {', '.join(failed)} failed to load and may provide it"
                    if failed else "a plugin package can provide it")
            raise UnknownNameError(
                f"unknown {SINGULAR[self.kind]} {name!r}.{did_you_mean(name, known)} "
                f"Registered: {', '.join(known) or 'none'}; {hint} (`graphengine plugins` lists "
                f"what each plugin registered, and load errors)") from None

    def names(self) -> list[str]:
        self._manager.load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Each registered object once (aliases folded in)."""
        self._manager.load()
        seen: dict[int, Entry] = {}
        for entry in self._entries.values():
            seen.setdefault(id(entry), entry)
        return sorted(seen.values(), key=lambda e: e.name)

    def __contains__(self, name: str) -> bool:
        self._manager.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@dataclass
class PluginRecord:
    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    disabled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "module": self.module, "registered": self.registered, "error": self.error,
                "disabled": self.disabled}


class PluginManager:
    """Loads plugins and keeps the registries. ``graphengine.get_plugin_manager()`` is the
    process-wide one; :func:`graphengine.testing.isolated_plugin_manager` makes private ones."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        self.registries = {kind: Registry(kind, self) for kind in KINDS}
        self.records: dict[str, PluginRecord] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._from_entry_point = False
        self._lock = threading.RLock()

    def __getattr__(self, kind: str) -> Registry:
        registries = self.__dict__.get("registries", {})
        if kind in registries:
            return registries[kind]
        raise AttributeError(kind)

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Register the core and the installed plugins, once. A load cut short (an interrupt
        during a plugin's import, or a fatal failure under GRAPHENGINE_STRICT_PLUGINS=1) leaves
        the manager unloaded and empty, so that the next lookup loads again instead of finding
        nothing registered."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            try:
                core = self.register(_Core(self), name=CORE_PLUGIN, distribution=CORE_PLUGIN,
                                     version=_version(CORE_PLUGIN))
                core.module = __name__
                if self._load_entry_points:
                    self._from_entry_point = True
                    try:
                        self._load_from_entry_points()
                    finally:
                        self._from_entry_point = False
            except BaseException:  # KeyboardInterrupt and SystemExit too: then re-raised
                self._unload()
                raise

    def _unload(self) -> None:
        for plugin in list(self.pm.get_plugins()):
            self.pm.unregister(plugin)
        for registry in self.registries.values():
            registry._entries.clear()
        self.records.clear()
        self._loaded = False

    def _load_from_entry_points(self) -> None:
        disabled = {n.strip() for n in os.environ.get("GRAPHENGINE_DISABLE_PLUGINS", "").split(",")
                    if n.strip()}
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                         key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            if ep.name in disabled:
                self.records[ep.name] = PluginRecord(ep.name, dist, version, ep.value, disabled=True)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._fail(PluginRecord(ep.name, dist, version, ep.value), exc, "failed to import")
                continue
            self.register(plugin, name=ep.name, distribution=dist, version=version)

    def register(self, plugin: Any, name: str | None = None, *, distribution: str | None = None,
                 version: str | None = None) -> PluginRecord:
        """Register a plugin object (usually a module) and run its registration hooks."""
        with self._lock:
            self.load()  # so that a clash with an installed plugin shows now, not later
            name = name or getattr(plugin, "__name__", None) or repr(plugin)
            record = PluginRecord(name, distribution, version, getattr(plugin, "__name__", None))
            try:
                self.pm.register(plugin, name=name)
                self.pm.check_pending()
            except Exception as exc:
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
                self._fail(record, exc, "is not a valid plugin")
                return record
            self.records[name] = record
            # All or nothing: a plugin whose registration fails part-way keeps none of it.
            before = {kind: dict(r._entries) for kind, r in self.registries.items()}
            try:
                failure = self._run_registration_hooks(record)
            except BaseException:  # an interrupt: undone, then re-raised
                self._undo_registration(plugin, record, before)
                self.records.pop(name, None)
                raise
            if failure is not None:
                self._undo_registration(plugin, record, before)
                self._fail(record, *failure)
            return record

    def _run_registration_hooks(self, record: PluginRecord) -> tuple[Exception, str] | None:
        """Run the plugin's registration hooks; the first failure and what failed, or None."""
        for kind in KINDS:
            hook = getattr(self.pm.hook, f"graphengine_register_{kind}")
            for impl in [i for i in hook.get_hookimpls() if i.plugin_name == record.name]:
                registrar = (self._command_registrar(record) if kind == "commands"
                             else self._registrar(kind, record))
                try:
                    impl.function(register=registrar)
                except Exception as exc:
                    return exc, f"failed while registering {kind}"
        return None

    def _undo_registration(self, plugin: Any, record: PluginRecord,
                           before: dict[str, dict[str, Entry]]) -> None:
        for kind, entries in before.items():
            self.registries[kind]._entries = entries
        record.registered = {}
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)

    def _registrar(self, kind: str, record: PluginRecord) -> Register:
        registry = self.registries[kind]

        def register(name: str, obj: Any, *, aliases: tuple[str, ...] = (),
                     override: bool = False) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {record.name!r} registered a {SINGULAR[kind]} with an "
                                  f"invalid name {name!r}")
            if not callable(obj):
                raise PluginError(f"plugin {record.name!r} registered {SINGULAR[kind]} {name!r} as "
                                  f"{obj!r}, which is not callable: register the class")
            entry = Entry(name, obj, record.name, record.distribution, tuple(aliases))
            registry.add(entry, override)
            record.registered.setdefault(kind, []).append(name)

        return register

    def _command_registrar(self, record: PluginRecord) -> Register:
        """The ``register`` callback of ``graphengine_register_commands``: it takes the parts
        of a :class:`Command`, and files the command in the ``commands`` registry."""
        registry = self.registries["commands"]

        def register(name: str, configure: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int], *, help: str | None = None,
                     override: bool = False) -> None:
            if not isinstance(name, str) or not name or name.startswith("-") or name.split() != [name]:
                raise PluginError(f"plugin {record.name!r} registered a command with an invalid "
                                  f"name {name!r}: one word, not starting with '-'")
            for part, value in (("configure", configure), ("run", run)):
                if not callable(value):
                    raise PluginError(f"plugin {record.name!r} registered command {name!r} with "
                                      f"{part}={value!r}, which is not callable")
            if help is None and run.__doc__:
                help = run.__doc__.strip().splitlines()[0]
            entry = Entry(name, Command(name, configure, run, help), record.name, record.distribution)
            registry.add(entry, override)
            record.registered.setdefault("commands", []).append(name)

        return register

    def _fail(self, record: PluginRecord, exc: Exception, what: str) -> None:
        """A plugin loaded from an entry point fails alone: recorded, warned about, and the
        others keep working. Registered by hand, or under GRAPHENGINE_STRICT_PLUGINS=1, it raises."""
        message = (f"plugin {record.name!r}" + (f" from distribution {record.distribution}"
                                                if record.distribution else "")
                   + f" {what}: {type(exc).__name__}: {exc}")
        record.error = message if record.error is None else f"{record.error}; {message}"
        self.records[record.name] = record
        strict = os.environ.get("GRAPHENGINE_STRICT_PLUGINS") == "1"
        if strict or not self._from_entry_point:
            error = PluginConflictError if isinstance(exc, PluginConflictError) else PluginError
            hint = " (GRAPHENGINE_STRICT_PLUGINS=1 makes this fatal)" if strict else ""
            raise error(message + hint) from exc
        warnings.warn(message + "; the other plugins keep working", PluginWarning, stacklevel=2)

    # -- reporting ------------------------------------------------------------------------

    def report(self) -> list[dict[str, Any]]:
        """Every plugin, by name: its distribution and version, what it registered (kind ->
        names), the ``aliases`` of those names (kind -> name -> aliases, where any), what it
        registered that cannot run here (``unavailable``: name -> the reason its
        ``unavailable_reason()`` gives, as for a backend whose library or hardware is missing),
        its load ``error`` and whether it was ``disabled``."""
        self.load()
        report = []
        for record in sorted(self.records.values(), key=lambda r: r.name):
            aliases: dict[str, dict[str, list[str]]] = {}
            unavailable: dict[str, str] = {}
            for kind, registry in self.registries.items():
                for entry in registry.entries():
                    if entry.plugin != record.name:
                        continue
                    if entry.aliases:
                        aliases.setdefault(kind, {})[entry.name] = list(entry.aliases)
                    reason = _unavailable_reason(entry)
                    if reason:
                        unavailable[entry.name] = reason
            report.append(record.as_dict() | {"aliases": aliases, "unavailable": unavailable})
        return report


class _Core:
    """The core's own contributions, registered first by every manager (not through an entry
    point, and not disabled by GRAPHENGINE_DISABLE_PLUGINS): the ``graphengine plugins`` command."""

    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager

    @hookimpl
    def graphengine_register_commands(self, register: Register) -> None:
        register("plugins", self.plugins_options, self.plugins_command)

    @staticmethod
    def plugins_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def plugins_command(self, args: argparse.Namespace) -> int:
        """List installed plugins, what each registered, and any load errors.

        The exit status is 1 when a plugin failed to load, so that scripts and CI notice."""
        report = self.manager.report()
        failed = [plugin["name"] for plugin in report if plugin["error"]]
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for plugin in report:
                print(_describe(plugin))
        if failed:
            print(f"graphengine plugins: {len(failed)} plugin(s) failed to load: {', '.join(failed)}",
                  file=sys.stderr)
        return 1 if failed else 0


def _describe(plugin: dict[str, Any]) -> str:
    """One plugin of :meth:`PluginManager.report` as the lines ``graphengine plugins`` prints."""
    origin = plugin["distribution"] or "-"
    version = f" {plugin['version']}" if plugin["version"] else ""
    state = " [disabled]" if plugin["disabled"] else (" [ERROR]" if plugin["error"] else "")
    lines = [f"{plugin['name']}  ({origin}{version}){state}"]
    for kind, names in sorted(plugin["registered"].items()):
        aliases = plugin["aliases"].get(kind, {})
        shown = [f"{name} (alias {', '.join(aliases[name])})" if name in aliases else name
                 for name in names]
        lines.append(f"    {kind}: {', '.join(shown)}")
    lines += [f"    {name}: unavailable: {reason}" for name, reason in plugin["unavailable"].items()]
    if plugin["error"]:
        lines.append(f"    error: {plugin['error']}")
    return "\n".join(lines)


def _unavailable_reason(entry: Entry) -> str | None:
    """Why a registered object that declares ``unavailable_reason()`` (a backend) cannot run
    here; a check that itself fails is reported as the reason, since listing must not crash."""
    check = getattr(entry.obj, "unavailable_reason", None)
    if not callable(check):
        return None
    try:
        return check()
    except Exception as exc:
        return f"unavailable_reason() failed: {type(exc).__name__}: {exc}"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def set_plugin_manager(manager: PluginManager | None) -> PluginManager | None:
    """Swap the process-wide manager (tests); returns the previous one."""
    global _manager
    with _manager_lock:
        previous, _manager = _manager, manager
        return previous
