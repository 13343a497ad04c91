"""Where env records come from: explicit local files, the ``DARE_GYM_DATA_DIR`` folder, else the hub.

Every reader turns a bad file into a :class:`DataFormatError` that names the file, the line (or record) and
the field: bytes that are not UTF-8, gzip data under a plain name or a ``.gz`` that is not gzip, malformed
JSON (nesting too deep, a number too long to read included), a file with no records, missing fields and fields
of the wrong type. Data that cannot be found raises a
:class:`DataNotFoundError` that names every place looked at and how to provide the data.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

DATA_DIR_VARIABLE = "DARE_GYM_DATA_DIR"
GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """A data file or record is malformed; the message names the file, the line or record, and the field."""


class DataNotFoundError(FileNotFoundError):
    """The data is neither where it was looked for locally nor on the hub; the message names the paths."""


class RecordList(list):
    """Records in file order, remembering where each came from so that errors can point at it."""

    def __init__(self, records: Iterable[dict], *, source: str, lines: Sequence[int] | None = None):
        super().__init__(records)
        self.source = source
        self.lines = list(lines) if lines is not None else None

    def where(self, position: int) -> str:
        """``"path:LINE: record N"`` for file records, ``"source: record N"`` otherwise (N counts from 1)."""
        if self.lines is not None:
            return f"{self.source}:{self.lines[position]}: record {position + 1}"
        return f"{self.source}: record {position + 1}"


def where(records: Sequence[dict], position: int, source: str | None = None) -> str:
    """Where record ``position`` of ``records`` came from, as precisely as is known."""
    if isinstance(records, RecordList):
        return records.where(position)
    return f"{source or getattr(records, 'source', 'records')}: record {position + 1}"


# ------------------------------------------------------------------------------------------ reading
def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a UTF-8 text file, gunzipped when its name ends in ``.gz``.

    A ``.gz`` name on data that is not gzip, gzip data under another name, corrupt gzip data and bytes
    that are not UTF-8 raise :class:`DataFormatError` naming the file (and the line where it applies).
    """
    path = Path(path)
    compressed = path.suffix == ".gz"
    with open(path, "rb") as raw:  # a missing file raises FileNotFoundError here, as it should
        head = raw.read(2)
    if compressed and head and head != GZIP_MAGIC:
        raise DataFormatError(f"{path}: the name ends in .gz but the file is not gzip-compressed "
                              f"(it starts with {head!r}); rename it without .gz")
    if not compressed and head == GZIP_MAGIC:
        raise DataFormatError(f"{path}: the file is gzip-compressed but its name does not end in .gz; "
                              f"rename it to {path.name}.gz")
    line_number = 0
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            for line_number, data in enumerate(handle, start=1):
                try:
                    yield line_number, data.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise DataFormatError(
                        f"{path}:{line_number}: not UTF-8 text (byte {data[error.start]:#04x} at byte "
                        f"{error.start + 1} of the line); re-encode the file as UTF-8"
                    ) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataFormatError(f"{path}: corrupt or truncated gzip data after line {line_number} ({error})") from None


class _LongNumber(str):
    """An integer of a JSON line with more digits than Python converts (``sys.get_int_max_str_digits``)."""


def _read_int(text: str):
    try:
        return int(text)
    except ValueError:  # more digits than the interpreter converts: named with its field below
        return _LongNumber(text)


def _long_number_field(value, path: str = "") -> str | None:
    """Where in a parsed record a :class:`_LongNumber` is (``answer``, ``meta.values[2]``), or None."""
    if isinstance(value, _LongNumber):
        return path
    if isinstance(value, dict):
        children = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for place, item in children:
        found = _long_number_field(item, place)
        if found is not None:
            return found
    return None


def _deep_field(line: str) -> str:
    """The top-level field under which a JSON line nests too deeply for the parser (a linear scan, made only
    once parsing has failed)."""
    depth, in_string, escaped, last_string, field, start = 0, False, False, None, None, 0
    for position, char in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string, last_string = False, line[start + 1:position]
        elif char == '"':
            in_string, start = True, position
        elif char == ":" and depth == 1:
            field = last_string
        elif char in "[{":
            depth += 1
            if depth > 64:
                break
        elif char in "]}":
            depth -= 1
    return f"field {field!r}" if field is not None else "the record"


def read_jsonl(path: str | os.PathLike) -> RecordList:
    """Every record of a JSONL file (``.gz`` too), in file order. Blank lines are skipped; a line that is
    not a JSON object (or that nests deeper, or holds a longer number, than Python reads) raises
    :class:`DataFormatError` naming the file, line, record and, where it can, the field."""
    records, lines = [], []
    for line_number, line in text_lines(path):
        if not line.strip():
            continue
        location = f"{path}:{line_number}: record {len(records) + 1}"
        try:
            record = json.loads(line, parse_int=_read_int)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise DataFormatError(f"{location}: {_deep_field(line)} is nested too deeply to read") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        long_number = _long_number_field(record)
        if long_number is not None:
            raise DataFormatError(f"{location}: field {long_number!r} holds a number of more digits than can be "
                                  "read (is it meant to be text? then quote it)")
        records.append(record)
        lines.append(line_number)
    return RecordList(records, source=str(path), lines=lines)


# ------------------------------------------------------------------------------------- validation
class ListOf:
    """A field type: a list whose items are all of ``item_type`` (``ListOf(str)`` for MBPP's ``test_list``)."""

    def __init__(self, item_type: type, *, non_empty: bool = False):
        self.item_type, self.non_empty = item_type, non_empty

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, list) and (bool(value) or not self.non_empty)
                and all(_is_instance(item, self.item_type) for item in value))

    def __str__(self) -> str:
        return f"a {'non-empty ' if self.non_empty else ''}list of {self.item_type.__name__}"


def _is_instance(value: Any, expected: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
        return False  # True is an int to Python, but never a task id or a count to a data file
    return isinstance(value, expected)


def _describe(expected) -> str:
    if isinstance(expected, ListOf):
        return str(expected)
    names = [t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,))]
    return " or ".join(names)


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_field(record: Mapping, name: str, expected, location: str) -> None:
    """Raise :class:`DataFormatError` at ``location`` unless ``record[name]`` has the expected type."""
    value = record[name]
    ok = expected.accepts(value) if isinstance(expected, ListOf) else _is_instance(value, expected)
    if not ok:
        raise DataFormatError(f"{location}: field {name!r} must be {_describe(expected)}, "
                              f"got {type(value).__name__} {_preview(value)}")


def require_fields(records: Sequence[dict], fields: Mapping[str, Any] | Sequence[str], source: str | None = None,
                   *, optional: Mapping[str, Any] | None = None) -> None:
    """Check that every record has ``fields`` (a list of names, or names mapped to their types) and that
    the ``optional`` fields it has are of their types; the first bad record raises :class:`DataFormatError`
    naming its file, line or record number, and the field."""
    types = dict(fields) if isinstance(fields, Mapping) else {name: None for name in fields}
    for position, record in enumerate(records):
        missing = [name for name in types if name not in record]
        if missing:
            raise DataFormatError(f"{where(records, position, source)} lacks field(s) {missing}; "
                                  f"it has {sorted(record)}")
        for name, expected in list(types.items()) + [(k, v) for k, v in (optional or {}).items() if k in record]:
            if expected is not None:
                check_field(record, name, expected, where(records, position, source))


# -------------------------------------------------------------------------------------- locating
def data_dir() -> Path | None:
    """The folder named by ``$DARE_GYM_DATA_DIR``, or None when the variable is unset. A variable that
    names no folder is an error at once (before any hub access), naming the path."""
    root = os.environ.get(DATA_DIR_VARIABLE)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(
            f"{DATA_DIR_VARIABLE}={root!r} {state}. Point it at a folder laid out like shared/data "
            f"(gsm8k/test.jsonl, math500/test.jsonl, humaneval/HumanEval.jsonl.gz, ...), or unset it to read "
            f"the Hugging Face hub."
        )
    return path


def local_lookup(relative_path: str) -> str:
    """Where ``relative_path`` was looked for locally and how to provide it, for error messages."""
    root = data_dir()
    if root is None:
        return f"{DATA_DIR_VARIABLE} is unset: pass data_files=<path>, or set it to a folder holding {relative_path}"
    return (f"{DATA_DIR_VARIABLE}={os.environ[DATA_DIR_VARIABLE]!r} has no {relative_path} (looked for "
            f"{root / relative_path}): add the file there, or pass data_files=<path>")


def resolve_local_file(data_files: str | os.PathLike | None, relative_path: str) -> Path | None:
    """The file to read: ``data_files`` if given (it must exist), else ``$DARE_GYM_DATA_DIR/relative_path``
    if that exists, else None (meaning: use the hub)."""
    if data_files is not None:
        path = Path(data_files)
        if not path.is_file():
            state = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise DataNotFoundError(f"data_files={str(data_files)!r} {state}")
        return path
    root = data_dir()
    if root is not None and (root / relative_path).is_file():
        return root / relative_path
    return None


def require_local_file(data_files: str | os.PathLike | None, relative_path: str, what: str) -> Path:
    """Like :func:`resolve_local_file` for data that has no hub copy: a missing file is an error saying
    where it was looked for and how to provide it."""
    path = resolve_local_file(data_files, relative_path)
    if path is None:
        raise DataNotFoundError(f"{what} has no hub copy and no local file: {local_lookup(relative_path)}")
    return path


def load_records(
    *,
    data_files: str | os.PathLike | None,
    relative_path: str,
    hub_loader: Callable[[], list[dict]],
    required_fields: Mapping[str, Any] | Sequence[str],
    optional_fields: Mapping[str, Any] | None = None,
    reader: Callable[[Path], list[dict]] = read_jsonl,
) -> tuple[list[dict], str]:
    """Records and a description of where they came from (a path or ``hub:<name>``), validated: every
    record has ``required_fields`` (names, or names mapped to types) and its ``optional_fields`` are typed."""
    path = resolve_local_file(data_files, relative_path)
    if path is not None:
        records, source = reader(path), str(path)
    else:
        try:
            records = hub_loader()
        except DataNotFoundError as error:
            raise DataNotFoundError(f"no local {relative_path} and {error}. {local_lookup(relative_path)}") \
                from error.__cause__
        source = getattr(records, "source", "hub")
    if not records:  # an env over no records would fail at reset() with a baffling index range
        raise DataFormatError(f"{source}: no records (the file is empty or holds only blank lines)")
    require_fields(records, required_fields, source, optional=optional_fields)
    return records, source


def hub_split(name: str, config: str | None, split: str) -> Callable[[], RecordList]:
    """A loader for a Hugging Face hub dataset split through ``datasets`` (cached by ``datasets``)."""

    def load() -> RecordList:
        import datasets

        try:
            dataset = datasets.load_dataset(name, config, split=split)
        except Exception as error:  # noqa: BLE001 - re-raised with where else the data was looked for
            raise DataNotFoundError(
                f"could not load {name!r} ({config or 'default'}, split {split!r}) from the Hugging Face hub "
                f"({type(error).__name__}: {error})"
            ) from error
        return RecordList((dict(row) for row in dataset), source=f"hub:{name}/{split}")

    return load
