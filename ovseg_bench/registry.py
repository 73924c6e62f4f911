"""Registries by name (house style rule 1): methods register where they are defined.

Built on mmengine's ``Registry`` (duplicates raise); unknown names fail with close matches.
Names are matched forgiving case and surrounding spaces (``" SCLIP"`` is ``sclip``) when that
leaves exactly one candidate: every registered id is lowercase (rule 12), so nothing is lost.

Plug-in packages add methods through the ``ovseg_bench.methods`` entry-point group: each entry
point names a module whose import registers its adapters. A plug-in that fails to import breaks
only itself: it is remembered, warned about once, and named when one of its methods is asked for.
Built-in method modules are part of this package, so their import errors are bugs and propagate.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from mmengine.registry import Registry

from .errors import ConfigError

METHODS = Registry("ovseg_bench method")
# ``--method <group>``: several methods by one name (plan.expand_methods).
METHOD_GROUPS: dict[str, tuple[str, ...]] = {"clip-family": ("clip", "maskclip", "sclip", "clearclip", "naclip")}
PLUGIN_GROUP = "ovseg_bench.methods"

# Built-in method modules; importing one registers its adapters.
_BUILTIN_METHOD_MODULES = ("ovseg_bench.methods.clip_family", "ovseg_bench.methods.predictions",
                           "ovseg_bench.methods.tcl", "ovseg_bench.methods.reco",
                           "ovseg_bench.methods.glcf", "ovseg_bench.methods.weaktr", "ovseg_bench.methods.clip_es")
_loaded = False

# Unknown-name messages print the whole known list only up to this length; longer lists (open_clip's
# models) get the close matches and a pointer to the command that lists them all.
SHOW_ALL_KNOWN = 12
SUGGESTIONS = 3
_LIST_COMMANDS = {"method": "ovseg-bench list methods", "dataset": "ovseg-bench list datasets",
                  "protocol": "ovseg-bench list protocols"}


class PluginImportWarning(UserWarning):
    """A plug-in entry point of ``ovseg_bench.methods`` could not be imported; its methods are absent."""


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    """One entry point whose import failed: what it is, who installed it, and why it failed."""

    name: str                 # the entry point's name (by convention the method it registers)
    value: str                # the module (or object) it points at
    distribution: str | None  # the installed package that declares it, when known
    error: str                # "ExceptionType: message"

    @property
    def entry_point(self) -> str:
        """``name = value`` as written in the declaring package's metadata."""
        return f"{self.name} = {self.value}"

    def describe(self) -> str:
        """"the plug-in entry point 'x = pkg.mod' (distribution pkg) which failed to import (...)"."""
        origin = f" (distribution {self.distribution})" if self.distribution else ""
        return (f"the plug-in entry point '{self.entry_point}'{origin} which failed to import ({self.error}); "
                "fix or uninstall that package")


_broken: dict[str, BrokenPlugin] = {}  # lowercased entry-point name -> its failure, filled by _load_methods


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_method("maskclip")``. Registering a name twice raises."""

    def decorator(cls: type) -> type:
        try:
            METHODS.register_module(name=name, module=cls)
        except KeyError as exc:
            raise ConfigError(f"method '{name}' is registered twice ({exc})") from None
        return cls

    return decorator


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    for entry in entry_points(group=PLUGIN_GROUP):
        _load_plugin(entry)


def _load_plugin(entry: EntryPoint) -> None:
    """Import one plug-in; on failure remember it and warn once instead of breaking every command."""
    try:
        entry.load()
    except Exception as exc:  # noqa: BLE001 - any import-time failure of foreign code, SyntaxError included
        broken = BrokenPlugin(entry.name, entry.value, _distribution_of(entry), f"{type(exc).__name__}: {exc}")
        _broken[entry.name.strip().lower()] = broken
        warnings.warn(f"skipped {broken.describe()}; until then its methods are unavailable", PluginImportWarning,
                      stacklevel=3)


def _distribution_of(entry: EntryPoint) -> str | None:
    """"name version" of the package declaring ``entry``; None for entry points made by hand."""
    dist = getattr(entry, "dist", None)
    if dist is None:
        return None
    try:
        return f"{dist.metadata['Name']} {dist.version}"
    except Exception:  # noqa: BLE001 - broken metadata must not hide the import error itself
        return None


def broken_plugins() -> list[BrokenPlugin]:
    """Plug-in entry points that failed to import, in the order they were tried."""
    _load_methods()
    return list(_broken.values())


def method_names() -> list[str]:
    _load_methods()
    return sorted(METHODS.module_dict)


def get_method(name: str) -> Any:
    """The adapter class registered as ``name`` (case and surrounding spaces forgiven).

    Raises ConfigError naming the broken plug-in when the method would have come from one.
    """
    _load_methods()
    if name in METHODS.module_dict:
        return METHODS.module_dict[name]
    broken = _broken.get(name.strip().lower())
    if broken is not None:
        raise ConfigError(f"method '{broken.name}' comes from {broken.describe()}")
    try:
        return METHODS.module_dict[resolve_name("method", name, method_names())]
    except ConfigError as exc:
        if not _broken:
            raise
        raise ConfigError(f"{exc}. It may come from a plug-in that failed to import: "
                          + "; ".join(b.describe() for b in _broken.values())) from None


def resolve_name(kind: str, name: str, known: list[str]) -> str:
    """The member of ``known`` that ``name`` means: itself, else the one equal to it after
    stripping spaces and ignoring case. Raises ConfigError (with suggestions) when there is none
    or when several differ only in case.
    """
    if name in known:
        return name
    wanted = name.strip().lower()
    same = [k for k in known if k.strip().lower() == wanted]
    if len(same) == 1:
        return same[0]
    if same:
        raise ConfigError(f"{kind} '{name}' matches {', '.join(same)} when case is ignored; give the exact name")
    raise ConfigError(unknown_name_message(kind, name, known))


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """"unknown dataset 'vco'. Did you mean voc? Known: ..." with close matches found ignoring case."""
    close = close_matches(name, known)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} '{name}'.{hint} {_known_text(kind, known)}"


def close_matches(name: str, known: list[str], n: int = SUGGESTIONS) -> list[str]:
    """Up to ``n`` members of ``known`` close to ``name``, compared stripped and lowercased."""
    by_key: dict[str, str] = {}
    for item in known:
        by_key.setdefault(item.strip().lower(), item)
    return [by_key[k] for k in difflib.get_close_matches(name.strip().lower(), list(by_key), n=n)]


def _known_text(kind: str, known: list[str]) -> str:
    """The whole list when short; otherwise its size and where to see it."""
    if len(known) <= SHOW_ALL_KNOWN:
        return f"Known: {', '.join(known)}"
    command = _LIST_COMMANDS.get(kind)
    if command:
        return f"{len(known)} are known; `{command}` lists them all"
    return f"{len(known)} are known, among them {', '.join(known[:SHOW_ALL_KNOWN])}, ..."
