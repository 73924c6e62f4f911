"""The project's one allow-list unpickler: pickled artefacts from elsewhere never run code.

``pickle.load`` resolves every ``module.name`` a file asks for (GLOBAL, STACK_GLOBAL and the
extension-registry opcodes all go through ``Unpickler.find_class``) and then calls it, so a
pickle can run anything, e.g. ``os.system``. :func:`safe_load` resolves only the globals its
caller lists and refuses every other one with :class:`UnsafePickleError`, before anything
from the file is called.

With the default (nothing allowed) exactly the values that pickle protocols 0-2 encode with
their own opcodes load: ``dict``, ``list``, ``tuple``, ``str``, ``bytes`` (as the Python 2
``str`` opcodes), ``int`` (``long`` too), ``float``, ``bool`` and ``None``. That is what the
refer toolkit's ``refs(<split_by>).p`` files hold: a Python 2 pickle of a list of dicts of
ints, strings and lists (lichengunc/refer@e3bbaa30d2ca41cf0e5c0d3819d7e4ed9fd38fff:data/README.md
lists the keys; its refer.py wrote and read them with Python 2 ``cPickle``). No global is
needed for them, so none is allowed: a Python 2 pickle names ``__builtin__.set`` or
``copy_reg._reconstructor`` only for sets and class instances, which those files do not
contain, and the second would build arbitrary objects. A caller whose files do need a global
lists it, spelled as the file spells it (``("__builtin__", "set")`` in a Python 2 file;
Python 3's import renaming for old protocols happens only in the default ``find_class``, which
is bypassed here): ``safe_load(f, allowed={("torch._utils", "_rebuild_tensor_v2"): fn})``.

``encoding="latin1"`` turns Python 2 ``str`` (bytes) into ``str`` one byte per character, so
it never fails; Python 2 ``unicode`` is stored as UTF-8 and decodes exactly either way. The
refs files' Python 2 ``str`` values are ASCII (the references load them under Python 3 with
``pickle.load``'s ASCII default: Seonghoon-Yu/Zero-shot-RIS@75ff6ed85e1c99e4ae01be5d7f15e78e690823c0
:refer/refer.py, ``REFER.__init__``), for which latin1 and ASCII agree.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DataError, OvsegError

__all__ = ["UnsafePickleError", "latin1_bytes", "safe_load", "safe_load_tensors", "TORCH_TENSOR_GLOBALS"]


class UnsafePickleError(DataError):
    """A pickle asked for a global that is not on the caller's allow-list (it was not loaded)."""


class _AllowListUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from ``allowed``."""

    def __init__(self, file: BinaryIO, *, allowed: Mapping[tuple[str, str], Any], encoding: str,
                 source: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = dict(allowed)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafePickleError(
            f"{self._source}: the pickle asks for the global '{module}.{name}', which is not on the "
            "allow-list; it was refused because loading it would run code from the file. Nothing "
            "from the file was executed. If the file should hold only plain data it is not the "
            "expected file (re-download it); a reader that needs this global must allow it by name")

    def persistent_load(self, pid: Any) -> Any:
        # Persistent ids hand an object to code outside the pickle (torch.save's storages):
        # nothing here provides them, so they are refused like globals.
        raise UnsafePickleError(
            f"{self._source}: the pickle holds a persistent id ({str(pid)[:60]!r}), which this "
            "plain-data reader does not resolve; it was refused and nothing from the file ran")


def _source_name(source: Path | BinaryIO) -> str:
    """The file's name for messages: the path, or a stream's ``name`` attribute."""
    if isinstance(source, (str, Path)):
        return str(source)
    return str(getattr(source, "name", "<pickle stream>"))


def _load(stream: BinaryIO, allowed: Mapping[tuple[str, str], Any], encoding: str, source: str) -> Any:
    unpickler = _AllowListUnpickler(stream, allowed=allowed, encoding=encoding, source=source)
    try:
        return unpickler.load()
    except OvsegError:
        raise
    except Exception as exc:  # any malformed byte sequence surfaces as some exception type
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc}); the file is "
                        "truncated or is not what it should be; re-download it") from None


def safe_load(source: Path | BinaryIO, *, allowed: Mapping[tuple[str, str], Any] | None = None,
              encoding: str = "latin1") -> Any:
    """Unpickle ``source`` (a path or a binary stream), resolving only allow-listed globals.

    Args:
        source: the file's path, or a binary stream positioned at the pickle.
        allowed: ``(module, name) -> object`` for each global the file may ask for, spelled as
            the file spells it; the object is returned where the file names it (for REDUCE it
            is then called with the file's arguments, so list only harmless callables).
            ``None`` (default): no global, plain builtins only (see the module docstring).
        encoding: how Python 2 ``str`` values decode (``pickle.Unpickler``'s ``encoding``).

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the file asks for a global (or a persistent id) not on the list;
            the message names the file and ``module.name``.
        DataError: the file is missing, unreadable or not a valid pickle.
    """
    allowed = {} if allowed is None else allowed
    name = _source_name(source)
    if not isinstance(source, (str, Path)):
        return _load(source, allowed, encoding, name)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read the pickle ({exc.strerror or exc})") from None
    return _load(io.BytesIO(data), allowed, encoding, name)


def latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """What ``_codecs.encode`` does in a protocol-2 pickle: bytes from a latin-1 string (how
    protocol 2 spells a bytes literal); anything else is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a latin-1 bytes literal")
    return text.encode("latin1")


def _storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` with ``weights_only=True`` on the CPU: a pickled tensor's
    storage is a ``torch.save`` archive, read without running code from it."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"a pickled tensor storage must be bytes, found {type(data).__name__}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _torch_tensor_globals() -> dict[tuple[str, str], Any]:
    import collections

    import torch._utils

    return {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict,  # a tensor's (empty) backward hooks
            ("_codecs", "encode"): latin1_bytes}


# What ``pickle.dump`` of plain CPU tensors names (ReCo's reference and embedding pickles).
TORCH_TENSOR_GLOBALS = (("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"),
                        ("collections", "OrderedDict"), ("_codecs", "encode"))


def safe_load_tensors(source: Path | BinaryIO) -> Any:
    """Unpickle a file of plain containers and tensors (``pickle.dump`` of a dict of tensors),
    the tensors mapped to the CPU through ``torch.load(weights_only=True)``; any other global is
    refused with :class:`UnsafePickleError` naming it."""
    return safe_load(source, allowed=_torch_tensor_globals())
