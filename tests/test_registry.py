"""The method registry: broken plug-ins break only themselves; names forgive case and spaces."""
from __future__ import annotations

import importlib
import types
import warnings
from importlib.metadata import EntryPoint

import pytest

from ovseg_bench import registry
from ovseg_bench.datasets.cards import load_card
from ovseg_bench.errors import ConfigError
from ovseg_bench.registry import (PluginImportWarning, get_method, method_names, register_method, resolve_name,
                                  unknown_name_message)

BUILTINS = {"clip", "maskclip", "sclip", "tcl"}


class _FakeEntryPoint:
    """An installed entry point whose module raises on import (or registers a method)."""

    def __init__(self, name: str, value: str, error: Exception | None = None, dist: object = None) -> None:
        self.name, self.value, self.group, self.dist = name, value, registry.PLUGIN_GROUP, dist
        self._error = error

    def load(self) -> None:
        if self._error is not None:
            raise self._error
        register_method(self.name)(type("PluginMethod", (), {"tracks": ("semantic",)}))


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch):
    """Install fake entry points for one test; the registry's load state and memory are restored after."""
    for module in registry._BUILTIN_METHOD_MODULES:  # registered once per process: not undone below
        importlib.import_module(module)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_broken", {})
    before = set(registry.METHODS.module_dict)

    def install(*entries: object) -> None:
        monkeypatch.setattr(registry, "entry_points", lambda **kw: list(entries))

    yield install
    for name in set(registry.METHODS.module_dict) - before:  # a working fake plug-in registered it
        del registry.METHODS.module_dict[name]


def _broken_pair() -> list[object]:
    dist = types.SimpleNamespace(metadata={"Name": "ovseg-foo"}, version="0.3")
    return [_FakeEntryPoint("foo", "ovseg_foo.methods", ImportError("cannot import name 'Net' from 'torchy'"), dist),
            EntryPoint(name="bar", value="ovseg_no_such_plugin.methods", group=registry.PLUGIN_GROUP),
            _FakeEntryPoint("plugin_ok", "ovseg_ok.methods")]


def test_a_broken_plugin_breaks_only_itself(plugins, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins(*_broken_pair())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every emission, not what the default filter shows
        names = method_names()
        method_names()
        get_method("sclip")
    assert BUILTINS <= set(names) and "plugin_ok" in names and not {"foo", "bar"} & set(names)
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginImportWarning)]
    assert len(messages) == 2, messages  # one per broken entry point, however often the registry is asked
    assert ("the plug-in entry point 'foo = ovseg_foo.methods' (distribution ovseg-foo 0.3) which failed to "
            "import (ImportError: cannot import name 'Net' from 'torchy'); fix or uninstall that package") \
        in messages[0]
    assert "'bar = ovseg_no_such_plugin.methods'" in messages[1]
    assert "ModuleNotFoundError: No module named 'ovseg_no_such_plugin'" in messages[1]

    with pytest.raises(ConfigError, match=r"^method 'foo' comes from the plug-in entry point 'foo = ovseg_foo\.meth"):
        get_method("foo")
    with pytest.raises(ConfigError, match=r"method 'bar' comes from .*\(ModuleNotFoundError: .*\); fix or uninstall"):
        get_method(" BAR ")
    with pytest.raises(ConfigError, match=r"unknown method 'qux'.* may come from a plug-in that failed .*foo = "):
        get_method("qux")

    code, stdout, stderr = cli("list", "methods")
    assert code == 0, stderr
    assert all(name in stdout for name in BUILTINS | {"plugin_ok"}) and "foo" not in stdout

    # Built-ins are this package: their import error is a bug and keeps its traceback.
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_BUILTIN_METHOD_MODULES", ("ovseg_bench.methods.no_such_builtin",))
    with pytest.raises(ModuleNotFoundError, match="no_such_builtin"):
        method_names()


@pytest.mark.parametrize("asked", ["SCLIP", " sclip ", "Sclip\t"])
def test_method_names_ignore_case_and_surrounding_spaces(asked: str) -> None:
    assert get_method(asked) is get_method("sclip")


@pytest.mark.parametrize("asked", [" ade20k", "ADE20K", " Voc20 "])
def test_dataset_names_ignore_case_and_surrounding_spaces(asked: str) -> None:
    assert load_card(asked) is load_card(asked.strip().lower())


def test_resolve_name_refuses_ambiguity_and_unknown_names() -> None:
    assert resolve_name("model", " ViT-B-16", ["ViT-B-16", "ViT-L-14"]) == "ViT-B-16"
    with pytest.raises(ConfigError, match="'ab' matches AB, Ab when case is ignored"):
        resolve_name("thing", "ab", ["AB", "Ab"])
    with pytest.raises(ConfigError, match="unknown thing 'abd'. Did you mean abc?"):
        resolve_name("thing", "abd", ["abc", "xyz"])


@pytest.mark.parametrize(("asked", "suggested"), [("MASKCLP", "maskclip"), (" Sclp ", "sclip")])
def test_method_suggestions_ignore_case(asked: str, suggested: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown method '{asked}'. Did you mean {suggested}"):
        get_method(asked)


def test_dataset_suggestions_ignore_case() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'VCO'. Did you mean voc"):
        load_card("VCO")


def test_long_known_lists_show_a_few_matches_and_how_to_list_all() -> None:
    known = [f"method_{k:02d}" for k in range(40)] + ["maskclip"]
    message = unknown_name_message("method", "MaskClp", known)
    assert "Did you mean maskclip?" in message and "41 are known; `ovseg-bench list methods` lists them all" in message
    assert "method_39" not in message
    other = unknown_name_message("open_clip model", "vit-b-61", [f"ViT-X-{k}" for k in range(30)] + ["ViT-B-16"])
    assert "Did you mean ViT-B-16" in other and "31 are known" in other and "ViT-X-29" not in other
    assert unknown_name_message("dataset", "vco", ["voc", "ade20k"]).endswith("Known: voc, ade20k")
