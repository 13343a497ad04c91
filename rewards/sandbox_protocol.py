"""The wire between a sandboxed program and its trusted checker: plain data with exact types, never code.

Both sides load this module (:mod:`dare_gym.rewards.sandbox_harness` in the program's process,
:mod:`dare_gym.rewards.code_checker` in the checker's). It imports only ``builtins``, ``struct`` and
``_collections`` (all cheap: two processes start per run) and nothing of ``dare_gym``, because the sandbox ships it to its child
processes as compiled code (see :mod:`dare_gym.rewards.sandbox_boot`).

A message is a 4-byte big-endian length and that many bytes holding one encoded ``dict`` with ``str`` keys
(at most :data:`MAX_MESSAGE_BYTES`). A value is a one-byte tag and its content, so every type comes back
exactly (lengths and counts are 4-byte big-endian):

===========================  ==========================================================================
Python value                 encoding
===========================  ==========================================================================
``None`` ``True`` ``False``  ``N`` ``T`` ``F``
``int``                      ``j`` + 8-byte signed; beyond 64 bits ``i`` + length + ``hex(x)`` in ASCII
``float`` ``complex``        ``f`` + IEEE 754 double (nan, inf, -0.0 exact); ``c`` + two doubles
``str``                      ``s`` + length + UTF-8 (lone surrogates kept, by ``surrogatepass``)
``bytes`` ``bytearray``      ``b`` / ``a`` + length + the bytes
``list`` ``tuple``           ``l`` / ``t`` + count + items
``set`` ``frozenset``        ``S`` / ``z`` + count + items
``dict``                     ``d`` + count + key, value, key, value, ... (any hashable keys)
``collections.deque``        ``q`` + count + items
dict views                   ``K`` / ``V`` / ``E`` + count + items: rebuilt as real ``keys``/``values``/
                             ``items`` views (``d.keys() == {1, 2}`` stays true)
other iterators              ``I`` + count + items (generators, ``map``, ``filter``...): materialized, read
                             back as a list iterator, so ``list(f(x))`` works and ``f(x) == [...]`` does not
``range``                    ``r`` + start, stop, step
a builtin class              ``y`` + length + its name (``int``, ``str``, ``ValueError``...): MBPP 533 passes
                             ``int`` to the function under test; a class of the program's is not plain data
:class:`Reference`           ``R`` + length + name: only from the checker to the program (objects built by
                             a benchmark's setup code inside the program, passed back to its functions)
:class:`Handle`              ``H`` + 8-byte id: only from the checker to the program (an object a call of one
                             of the program's classes made, which stays in the program: MBPP 601's tests
                             build ``Pair(5, 24)`` and pass a list of them to the function under test)
===========================  ==========================================================================

Subclasses of these types travel as their base type (a ``namedtuple`` as a tuple, a ``Counter`` as a dict),
which compare equal the same way. Anything else (a class instance, a function, a cycle, nesting deeper than
:data:`MAX_DEPTH`) cannot be encoded: :func:`encode` raises :class:`Unencodable`.

:func:`decode` is the checker's guard: it accepts only the shapes above, rebuilds them from builtin types only,
and raises :class:`ProtocolError` on anything else (an unknown tag, a count larger than the bytes left, bad
UTF-8, an unhashable set member, trailing bytes). So no object of the program's, and none of its methods (an
``__eq__`` that always says True included), ever exists in the checker. Never pickle, never ``marshal``: both
can build objects that run code or crash the reader.
"""

from __future__ import annotations

import builtins
import os
import struct
from _collections import deque

__all__ = [
    "Handle",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_MESSAGE_BYTES",
    "ProtocolError",
    "Reference",
    "Unencodable",
    "decode",
    "encode",
    "parse_message",
    "read_message",
    "write_message",
]

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""Largest message either side accepts (a longer one is a protocol error)."""
MAX_DEPTH = 64
"""Deepest nesting of containers in one value."""
MAX_ITEMS = 1_000_000
"""Most items materialized from one iterator (an endless generator cannot be sent)."""

_HEADER = 4
_INT64 = 1 << 63
_COUNT = struct.Struct(">I")
_INT = struct.Struct(">q")
_FLOAT = struct.Struct(">d")
_COMPLEX = struct.Struct(">dd")
_VIEW_TAGS = {type({}.keys()): b"K", type({}.values()): b"V", type({}.items()): b"E"}
_SEQUENCE_TAGS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z", deque: b"q"}


class ProtocolError(Exception):
    """What the peer sent is not a valid message or value."""


class Unencodable(Exception):
    """A value that plain data cannot carry (a class instance, a function, a cycle, too deep, too long)."""


class Reference:
    """A name in the program's namespace, sent by the checker in place of an object that exists only in the
    program (what a benchmark's setup code built there, e.g. MBPP 367's trees of the program's ``Node``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"


class Handle:
    """Stands, in the checker, for an object that exists only in the program: what a call of one of the
    program's classes returned (see ``CheckSpec.constructors``). The checker can only pass it back to the
    program; it compares equal to itself alone (the checker keeps one handle per object), so it can never stand
    in for a value a test expects."""

    __slots__ = ("ident",)

    def __init__(self, ident: int):
        self.ident = ident

    def __repr__(self) -> str:
        return f"<object {self.ident} of the sandboxed program>"


def _builtin_classes() -> dict[str, type]:
    return {name: value for name, value in vars(builtins).items() if isinstance(value, type) and type(value) is type}


_BUILTIN_CLASSES = _builtin_classes()


# ------------------------------------------------------------------------------------------------ encoding


def encode(value) -> bytes:
    """``value`` as bytes (see the module docstring); raises :class:`Unencodable` for what is not plain data."""
    parts: list[bytes] = []
    _encode(value, parts, 0)
    return b"".join(parts)


def _encode_text(tag: bytes, data: bytes, parts: list) -> None:
    parts += (tag, _COUNT.pack(len(data)), data)


def _encode_items(tag: bytes, items, parts: list, depth: int) -> None:
    items = list(items)
    parts += (tag, _COUNT.pack(len(items)))
    for item in items:
        _encode(item, parts, depth + 1)


def _encode(value, parts: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Unencodable(f"nesting deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or value is True or value is False:
        parts.append(b"N" if value is None else b"T" if value else b"F")
    elif kind is int:
        if -_INT64 <= value < _INT64:
            parts += (b"j", _INT.pack(value))
        else:
            _encode_text(b"i", hex(value).encode("ascii"), parts)
    elif kind is float:
        parts += (b"f", _FLOAT.pack(value))
    elif kind is str:
        _encode_text(b"s", value.encode("utf-8", "surrogatepass"), parts)
    elif kind in _SEQUENCE_TAGS:
        _encode_items(_SEQUENCE_TAGS[kind], value, parts, depth)
    elif kind is dict:
        parts += (b"d", _COUNT.pack(len(value)))
        for key, item in list(value.items()):
            _encode(key, parts, depth + 1)
            _encode(item, parts, depth + 1)
    else:
        _encode_other(value, parts, depth)


def _encode_other(value, parts: list, depth: int) -> None:
    """Subclasses of the plain types (as their base type) and the less common plain types."""
    kind = type(value)
    if kind is Reference:
        _encode_text(b"R", value.name.encode("utf-8"), parts)
    elif kind is Handle:
        parts += (b"H", _INT.pack(value.ident))
    elif kind is type and _BUILTIN_CLASSES.get(value.__name__) is value:
        _encode_text(b"y", value.__name__.encode("ascii"), parts)
    elif kind in _VIEW_TAGS:
        items = [tuple(pair) for pair in value] if kind is type({}.items()) else value
        _encode_items(_VIEW_TAGS[kind], items, parts, depth)
    elif isinstance(value, int):  # subclasses (IntEnum, a str subclass...) as an exact copy of the base
        _encode(int.__int__(value), parts, depth)
    elif isinstance(value, float):
        _encode(float.__float__(value), parts, depth)
    elif isinstance(value, str):
        _encode(str.__str__(value), parts, depth)
    elif isinstance(value, complex):
        parts += (b"c", _COMPLEX.pack(value.real, value.imag))
    elif isinstance(value, (bytes, bytearray)):
        _encode_text(b"a" if isinstance(value, bytearray) else b"b", bytes(value), parts)
    elif isinstance(value, range):
        parts.append(b"r")
        for number in (value.start, value.stop, value.step):
            _encode(number, parts, depth + 1)
    elif isinstance(value, dict):
        _encode(dict(dict.items(value)), parts, depth)
    elif isinstance(value, (tuple, list, set, frozenset, deque)):
        base = next(b for b in _SEQUENCE_TAGS if isinstance(value, b))
        _encode_items(_SEQUENCE_TAGS[base], value, parts, depth)
    elif hasattr(kind, "__next__") and hasattr(kind, "__iter__"):
        items = []
        for item in value:
            if len(items) >= MAX_ITEMS:
                raise Unencodable(f"an iterator of more than {MAX_ITEMS} items")
            items.append(item)
        _encode_items(b"I", items, parts, depth)
    else:
        raise Unencodable(f"a value of type {kind.__name__}, which is not plain data")


# ------------------------------------------------------------------------------------------------ decoding


class _Reader:
    """Reads one value from ``data``; every read is bounds-checked, every count checked against the bytes
    left (so a forged count cannot make the reader allocate)."""

    __slots__ = ("data", "pos", "resolve", "handles")

    def __init__(self, data: bytes, resolve, handles):
        self.data, self.pos, self.resolve, self.handles = data, 0, resolve, handles

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise ProtocolError(f"a value cut off at byte {len(self.data)}")
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def count(self) -> int:
        number = _COUNT.unpack(self.take(4))[0]
        if number > len(self.data) - self.pos:
            raise ProtocolError(f"a count of {number} with {len(self.data) - self.pos} bytes left")
        return number

    def items(self, depth: int) -> list:
        return [self.value(depth + 1) for _ in range(self.count())]

    def text(self) -> str:
        try:
            return self.take(self.count()).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as error:
            raise ProtocolError(f"a string that is not UTF-8: {error}") from None

    def value(self, depth: int = 0):
        if depth > MAX_DEPTH:
            raise ProtocolError(f"nesting deeper than {MAX_DEPTH}")
        tag = self.take(1)
        simple = _SIMPLE.get(tag, _MISSING)
        if simple is not _MISSING:
            return simple
        builder = _BUILDERS.get(tag)
        if builder is None:
            raise ProtocolError(f"unknown tag {tag!r}")
        try:
            return builder(self, depth)
        except TypeError as error:  # an unhashable set member or dict key
            raise ProtocolError(f"malformed {tag.decode('ascii')!r} value: {error}") from None


def _big_int(reader: _Reader, depth: int) -> int:
    text = reader.take(reader.count())
    try:
        return int(text.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("a malformed big integer") from None


def _dict(reader: _Reader, depth: int) -> dict:
    result = {}
    for _ in range(reader.count()):
        key = reader.value(depth + 1)
        result[key] = reader.value(depth + 1)
    return result


def _range(reader: _Reader, depth: int) -> range:
    bounds = [reader.value(depth + 1) for _ in range(3)]
    if any(type(b) is not int for b in bounds) or bounds[2] == 0:
        raise ProtocolError("a range needs three integers and a step that is not 0")
    return range(*bounds)


def _reference(reader: _Reader, depth: int):
    name = reader.text()
    if reader.resolve is None:
        raise ProtocolError("a reference where only plain data may come")
    return reader.resolve(name)


def _handle(reader: _Reader, depth: int):
    ident = _INT.unpack(reader.take(8))[0]
    if reader.handles is None:
        raise ProtocolError("a handle where only plain data may come")
    if ident not in reader.handles:
        raise ProtocolError(f"a handle to no object ({ident})")
    return reader.handles[ident]


def _builtin_class(reader: _Reader, depth: int) -> type:
    name = reader.text()
    if name not in _BUILTIN_CLASSES:
        raise ProtocolError(f"{name[:60]!r} is not a builtin class")
    return _BUILTIN_CLASSES[name]


def _items_view(reader: _Reader, depth: int):
    pairs = reader.items(depth)
    if any(type(pair) is not tuple or len(pair) != 2 for pair in pairs):
        raise ProtocolError("an items view needs (key, value) pairs")
    return dict(pairs).items()


_MISSING = object()
_SIMPLE = {b"N": None, b"T": True, b"F": False}
_BUILDERS = {
    b"j": lambda r, d: _INT.unpack(r.take(8))[0],
    b"i": _big_int,
    b"f": lambda r, d: _FLOAT.unpack(r.take(8))[0],
    b"c": lambda r, d: complex(*_COMPLEX.unpack(r.take(16))),
    b"s": lambda r, d: r.text(),
    b"b": lambda r, d: r.take(r.count()),
    b"a": lambda r, d: bytearray(r.take(r.count())),
    b"l": lambda r, d: r.items(d),
    b"t": lambda r, d: tuple(r.items(d)),
    b"S": lambda r, d: set(r.items(d)),
    b"z": lambda r, d: frozenset(r.items(d)),
    b"q": lambda r, d: deque(r.items(d)),
    b"d": _dict,
    b"I": lambda r, d: iter(r.items(d)),
    b"K": lambda r, d: dict.fromkeys(r.items(d)).keys(),
    b"V": lambda r, d: dict(enumerate(r.items(d))).values(),
    b"E": _items_view,
    b"r": _range,
    b"y": _builtin_class,
    b"R": _reference,
    b"H": _handle,
}


def decode(data: bytes, resolve=None, handles=None):
    """The value that :func:`encode` made ``data`` from, built from builtin types only.

    On the program's side, ``resolve(name)`` turns a :class:`Reference` into an object and ``handles`` (id ->
    object) a :class:`Handle`; without them either is a :class:`ProtocolError`, as is anything :func:`encode`
    does not make.
    """
    reader = _Reader(bytes(data), resolve, handles)
    value = reader.value()
    if reader.pos != len(reader.data):
        raise ProtocolError(f"{len(reader.data) - reader.pos} bytes after the value")
    return value


# ------------------------------------------------------------------------------------------------ messages


def write_message(fd: int, message: dict) -> None:
    """Send one message (a dict of plain data) on ``fd``; :class:`Unencodable` if it is not plain data or
    larger than :data:`MAX_MESSAGE_BYTES`."""
    payload = encode(message)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Unencodable(f"a message of {len(payload)} bytes (the limit is {MAX_MESSAGE_BYTES})")
    view = memoryview(_COUNT.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def _message(payload: bytes, resolve, handles=None) -> dict:
    message = decode(payload, resolve, handles)
    if type(message) is not dict or any(type(key) is not str for key in message):
        raise ProtocolError(f"a message that is a {type(message).__name__}, not a dict with str keys")
    return message


def parse_message(data: bytes, resolve=None) -> dict:
    """The one message that ``data`` holds (all that was read from a channel); :class:`ProtocolError` if it
    holds anything else."""
    if len(data) < _HEADER:
        raise ProtocolError(f"{len(data)} bytes, not a message")
    size = _COUNT.unpack(data[:_HEADER])[0]
    if size != len(data) - _HEADER:
        raise ProtocolError(f"a message header for {size} bytes before {len(data) - _HEADER} bytes")
    return _message(data[_HEADER:], resolve)


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, resolve=None, handles=None) -> dict | None:
    """The next message on ``fd``; ``None`` at end of file before a message starts.

    Raises :class:`ProtocolError` for a cut-off, oversized or malformed message.
    """
    header = _read_exactly(fd, _HEADER)
    if not header:
        return None
    if len(header) < _HEADER:
        raise ProtocolError("the channel closed inside a message header")
    size = _COUNT.unpack(header)[0]
    if not 0 < size <= MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {size} bytes (the limit is {MAX_MESSAGE_BYTES})")
    payload = _read_exactly(fd, size)
    if len(payload) < size:
        raise ProtocolError(f"the channel closed after {len(payload)} of {size} message bytes")
    return _message(payload, resolve, handles)
