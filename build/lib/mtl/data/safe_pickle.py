"""Read dataset pickles without letting them run code.

A pickle can name any importable callable and have the unpickler call it, so a tampered or
mis-downloaded ``*.pkl`` is a code-execution vector. Dataset pickles only ever need numpy arrays
and plain containers, so :func:`safe_load` resolves exactly those globals and refuses the rest.

:func:`iter_pickled_bytes` never builds objects at all: it walks the opcode stream and yields the
byte strings it finds, which is how the tieredImageNet PNG lists (several GB each) are read with
memory bounded by one image.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import collections
import os
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mtl.errors import DataError

__all__ = ["safe_load", "iter_pickled_bytes"]

_NOT_EXPECTED = "the file may be malicious or is not the expected dataset file"

# Errors the unpickler raises on a damaged or cut-short stream.
_CORRUPT_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    struct.error,
    UnicodeError,
)

_LATIN1_NAMES = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode``: Python 3 writes ``bytes`` at protocol <= 2 as
    ``_codecs.encode(text, 'latin1')``. Only that codec is allowed, so a pickle cannot make us
    import an arbitrary codec module."""
    if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only for str with latin1, got {encoding!r}")
    return obj.encode("latin1", errors)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables an ndarray / dtype / scalar pickle names, under both module spellings
    (``numpy.core`` before numpy 2, ``numpy._core`` since), resolved to this numpy's objects."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric

    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        found[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol 5 arrays
            found[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return found


_BUILTIN_TYPES = ("list", "dict", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "bool", "complex")

_ALLOWED: dict[tuple[str, str], object] = {
    **{("builtins", name): getattr(builtins, name) for name in _BUILTIN_TYPES},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    **_numpy_globals(),
}


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (``__builtin__``, ``copy_reg`` ...) the way pickle's ``fix_imports`` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, *, encoding: str, source: str):
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str):
        key = _py3_name(module, name)
        if key not in _ALLOWED:
            wanted = ".".join(key) + ("" if key == (module, name) else f" (written as {module}.{name})")
            raise DataError(
                f"Refused to unpickle {self._source}: it asks for the global '{wanted}', "
                f"which is not on the allow-list (numpy arrays and plain containers); "
                f"{_NOT_EXPECTED}. Check the file's checksum, delete it and download it again."
            )
        return _ALLOWED[key]

    def persistent_load(self, pid):
        raise DataError(
            f"Refused to unpickle {self._source}: it uses persistent ids; {_NOT_EXPECTED}."
        )


def _describe(path_or_file) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return str(path_or_file)
    return str(getattr(path_or_file, "name", "<file object>"))


def safe_load(path_or_file: str | os.PathLike | BinaryIO, *, encoding: str = "latin1") -> object:
    """Unpickle a dataset file allowing only numpy arrays, dtypes, scalars and plain containers.

    ``encoding`` is how Python 2 ``str`` objects are decoded: ``"latin1"`` (the default) keeps
    numpy payloads byte-exact and gives ``str`` keys; ``"bytes"`` keeps them as ``bytes`` (as
    CIFAR-100's ``b'data'`` keys). Any other global, a truncated or corrupt stream raises
    :class:`~mtl.errors.DataError` naming the file.
    """
    source = _describe(path_or_file)
    if isinstance(path_or_file, (str, os.PathLike)):
        try:
            with open(path_or_file, "rb") as f:
                return _load(f, encoding, source)
        except FileNotFoundError as e:
            raise DataError(f"Pickle file not found: {source}. Download it (or place it there by hand).") from e
    return _load(path_or_file, encoding, source)


def _load(f: BinaryIO, encoding: str, source: str) -> object:
    try:
        return _AllowListUnpickler(f, encoding=encoding, source=source).load()
    except DataError:
        raise
    except _CORRUPT_ERRORS as e:
        raise DataError(
            f"Could not unpickle {source}: {type(e).__name__}: {e}. The file is truncated or corrupt, "
            f"or {_NOT_EXPECTED}. Delete it and download it again."
        ) from e


# --------------------------------------------------------------------------- opcode streaming

def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"expected {n} bytes but only {len(data)} remain")
    return data


def _sized(length_format: str) -> Callable[[BinaryIO], bytes]:
    size = struct.calcsize(length_format)

    def read(f: BinaryIO) -> bytes:
        (n,) = struct.unpack(length_format, _read_exact(f, size))
        if n < 0:
            raise ValueError(f"negative length {n}")
        return _read_exact(f, n)

    return read


def _sized_text(length_format: str) -> Callable[[BinaryIO], bytes | None]:
    """UTF-8 text opcodes; Python 3 protocol <= 2 stores bytes as latin-1 text, so undo that."""
    read_raw = _sized(length_format)

    def read(f: BinaryIO) -> bytes | None:
        return _text_to_bytes(read_raw(f).decode("utf-8", "surrogatepass"))

    return read


def _text_to_bytes(text: str) -> bytes | None:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # real text, not a byte payload
        return None


def _read_quoted_line(f: BinaryIO) -> bytes:
    """Protocol-0 STRING: a repr-quoted, backslash-escaped line (pickletools insists on ASCII)."""
    line = f.readline()
    if not line.endswith(b"\n"):
        raise ValueError("no newline after a protocol-0 string")
    line = line[:-1]
    if len(line) < 2 or line[:1] not in (b"'", b'"') or line[-1:] != line[:1]:
        raise ValueError(f"no string quotes around {line[:40]!r}")
    return codecs.escape_decode(line[1:-1])[0]


def _read_unicode_line(f: BinaryIO) -> bytes | None:
    line = f.readline()
    if not line.endswith(b"\n"):
        raise ValueError("no newline after a protocol-0 unicode string")
    return _text_to_bytes(line[:-1].decode("raw-unicode-escape"))


# Opcodes whose argument may be a byte payload, read raw (one copy, no latin-1 round trip).
_PAYLOAD_READERS: dict[bytes, Callable[[BinaryIO], bytes | None]] = {
    pickle.STRING: _read_quoted_line,
    pickle.BINSTRING: _sized("<i"),
    pickle.SHORT_BINSTRING: _sized("<B"),
    pickle.BINBYTES: _sized("<I"),
    pickle.SHORT_BINBYTES: _sized("<B"),
    pickle.BINBYTES8: _sized("<Q"),
    pickle.BYTEARRAY8: _sized("<Q"),
    pickle.UNICODE: _read_unicode_line,
    pickle.BINUNICODE: _sized_text("<I"),
    pickle.SHORT_BINUNICODE: _sized_text("<B"),
    pickle.BINUNICODE8: _sized_text("<Q"),
}

_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}


def iter_pickled_bytes(path: str | os.PathLike, prefix: bytes = b"\x89PNG") -> Iterator[bytes]:
    """Yield, in file order, every byte string in the pickle at ``path`` that starts with ``prefix``.

    The file is never unpickled: each opcode is read and its argument dropped unless it is a
    payload that matches, so memory stays bounded by one payload whatever the file size, and no
    code in the file can run. This covers the encodings a list of 1-D uint8 arrays (each a PNG
    file) takes: Python 2 ``BINSTRING``/``SHORT_BINSTRING``/``STRING``, Python 3 protocol <= 2
    ``_codecs.encode(text, 'latin1')`` and protocol >= 3 ``BINBYTES``/``SHORT_BINBYTES``/
    ``BINBYTES8``/``BYTEARRAY8``. A truncated or corrupt stream raises DataError naming the file.
    """
    path = Path(path)
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError as e:
        raise DataError(f"Pickle file not found: {path}. Download it (or place it there by hand).") from e
    with f:
        yield from _walk_opcodes(f, prefix, str(path))


def _walk_opcodes(f: BinaryIO, prefix: bytes, source: str) -> Iterator[bytes]:
    while True:
        code = f.read(1)
        if not code:
            raise DataError(
                f"Pickle {source} ends without a STOP opcode at byte {f.tell()}: the file is truncated. "
                "Delete it and download it again."
            )
        try:
            if code in _PAYLOAD_READERS:
                payload = _PAYLOAD_READERS[code](f)
                if payload is not None and payload.startswith(prefix):
                    yield payload
                continue
            op = _OPCODES.get(code)
            if op is None:
                raise ValueError(f"unknown opcode {code!r}")
            if op.arg is not None:
                op.arg.reader(f)
        except (ValueError, struct.error, UnicodeError) as e:
            raise DataError(
                f"Could not read pickle {source} near byte {f.tell()}: {e}. The file is truncated or "
                f"corrupt, or {_NOT_EXPECTED}. Delete it and download it again."
            ) from e
        if code == pickle.STOP:
            return
