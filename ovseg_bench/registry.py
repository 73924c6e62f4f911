"""Registries by name (house style rule 1): methods register where they are defined.

Built on mmengine's ``Registry`` (duplicates raise); unknown names fail with close matches.
Plug-in packages add methods through the ``ovseg_bench.methods`` entry-point group: each entry
point names a module whose import registers its adapters.
"""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from mmengine.registry import Registry

from .errors import ConfigError

METHODS = Registry("ovseg_bench method")

# Built-in method modules; importing one registers its adapters.
_BUILTIN_METHOD_MODULES = ("ovseg_bench.methods.clip_family", "ovseg_bench.methods.predictions",
                           "ovseg_bench.methods.tcl")
_loaded = False


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
    for entry in entry_points(group="ovseg_bench.methods"):
        entry.load()


def method_names() -> list[str]:
    _load_methods()
    return sorted(METHODS.module_dict)


def get_method(name: str) -> Any:
    """The adapter class registered as ``name``."""
    _load_methods()
    cls = METHODS.module_dict.get(name)
    if cls is None:
        raise ConfigError(unknown_name_message("method", name, method_names()))
    return cls


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Known: {', '.join(known)}"
