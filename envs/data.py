"""Where env records come from: explicit local files, the ``DARE_GYM_DATA_DIR`` folder, else the hub."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Callable, Sequence

DATA_DIR_VARIABLE = "DARE_GYM_DATA_DIR"


class DataFormatError(ValueError):
    """A data file has a malformed record; the message names the file and the line."""


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSONL file (``.gz`` too), in file order. Blank lines are skipped; a malformed line
    raises :class:`DataFormatError` naming the file and line number."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def require_fields(records: Sequence[dict], fields: Sequence[str], source: str) -> None:
    """Raise :class:`DataFormatError` naming the first record (1-based, as a line number) missing a field."""
    for number, record in enumerate(records, start=1):
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataFormatError(f"{source}: record {number} lacks field(s) {missing}; it has {sorted(record)}")


def resolve_local_file(data_files: str | os.PathLike | None, relative_path: str) -> Path | None:
    """The file to read: ``data_files`` if given (it must exist), else ``$DARE_GYM_DATA_DIR/relative_path``
    if that exists, else None (meaning: use the hub)."""
    if data_files is not None:
        path = Path(data_files)
        if not path.is_file():
            raise FileNotFoundError(f"data_files={str(data_files)!r} is not a file")
        return path
    root = os.environ.get(DATA_DIR_VARIABLE)
    if root:
        candidate = Path(root) / relative_path
        if candidate.is_file():
            return candidate
    return None


def require_local_file(data_files: str | os.PathLike | None, relative_path: str, what: str) -> Path:
    """Like :func:`resolve_local_file` for data that has no hub copy: a missing file is an error saying how
    to provide it."""
    path = resolve_local_file(data_files, relative_path)
    if path is None:
        raise FileNotFoundError(f"{what} is read from {relative_path}: pass data_files= or set {DATA_DIR_VARIABLE} "
                                f"to a folder holding {relative_path}")
    return path


def load_records(
    *,
    data_files: str | os.PathLike | None,
    relative_path: str,
    hub_loader: Callable[[], list[dict]],
    required_fields: Sequence[str],
    reader: Callable[[Path], list[dict]] = read_jsonl,
) -> tuple[list[dict], str]:
    """Records and a description of where they came from (a path or ``hub:<name>``)."""
    path = resolve_local_file(data_files, relative_path)
    if path is not None:
        records, source = reader(path), str(path)
    else:
        records, source = hub_loader(), "hub"
    require_fields(records, required_fields, source)
    return records, source


def hub_split(name: str, config: str | None, split: str) -> Callable[[], list[dict]]:
    """A loader for a Hugging Face hub dataset split through ``datasets`` (cached by ``datasets``)."""

    def load() -> list[dict]:
        import datasets

        try:
            dataset = datasets.load_dataset(name, config, split=split)
        except Exception as error:  # noqa: BLE001 - re-raised with the way out
            raise RuntimeError(
                f"could not load {name!r} ({config or 'default'}, split {split!r}) from the Hugging Face hub: "
                f"{error}. Offline? Pass data_files=<path> or set {DATA_DIR_VARIABLE} to a folder of local files."
            ) from error
        return [dict(row) for row in dataset]

    return load
