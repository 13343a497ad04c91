"""Typed configs from YAML files and dotted command-line overrides, with errors that name the bad field.

    config = load_config(TrainConfig, default_config_path(), ["algorithm.beta=0.02"])

Overrides are ``dotted.path=value``; the value is parsed as YAML (``1e-4``, ``true``, ``[1, 2]``, ``null``).
A config dataclass documents each field where it is declared, with a string on the line below it (CleanRL's
manner) or a trailing comment; :func:`field_docs` reads them for ``--help`` and ``dare-gym algorithms``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml


DEFAULT_CONFIG = "default.yaml"


class ConfigError(ValueError):
    """A config field has an unknown name or a value of the wrong type or range."""


def default_config_path() -> Path:
    """The packaged config of ``dare-gym train`` with no arguments (equal to ``TrainConfig()``)."""
    return Path(str(resources.files("dare_gym") / "configs" / DEFAULT_CONFIG))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [option for option in options if option is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message, mentioning null
            try:
                return _coerce(value, real[0], where)
            except ConfigError as error:
                raise ConfigError(f"{error} (or null)") from None
        for option in real:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return dataclass_from_dict(tp, value, where=where)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def dataclass_from_dict(cls: type, data: dict[str, Any], *, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config field(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid fields{' of ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {error}") from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is {child!r}, not a mapping")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like field.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from None
        parsed.append((key.strip(), value))
    return parsed


ALGORITHM_SECTION = "algorithm"


def load_config_dict(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML (or JSON) file's fields with the dotted ``overrides`` applied in order.

    An algorithm section belongs to the algorithm it names: an override that chooses an algorithm
    (``algorithm.name=X``, or a whole ``algorithm=...``) starts the section afresh, so no field the file set for
    its own algorithm carries over to X; the other ``algorithm.<field>`` overrides of the command apply on top,
    whatever their order."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:  # JSON (a run's saved config.json) is read as JSON: YAML 1.1 would take 1e-05 for a string
            data = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path}: not valid {path.suffix == '.json' and 'JSON' or 'YAML'}: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    parsed = parse_overrides(overrides)
    if any(key in (ALGORITHM_SECTION, f"{ALGORITHM_SECTION}.name") for key, _ in parsed):
        data.pop(ALGORITHM_SECTION, None)
    for key, value in parsed:
        set_dotted(data, key, value)
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """A ``cls`` dataclass from an optional YAML file plus dotted overrides."""
    return dataclass_from_dict(cls, load_config_dict(path, overrides))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------- field docs


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> dict[str, str]:
    """The docs written in ``cls``'s own body: a string statement right after a field, else the field's
    trailing comment."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined in a notebook or from a string: no source to read
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    docs = _docstring_attributes(cls.__doc__ or "")
    for node, following in zip(body, [*body[1:], None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
        elif node.end_lineno in comments:
            docs[node.target.id] = comments[node.end_lineno]
    return docs


def _docstring_attributes(doc: str) -> dict[str, str]:
    """The first sentence of each entry of a Google-style ``Attributes:`` section (``name: what it is.``)."""
    entries: dict[str, str] = {}
    inside, indent, name = False, None, None
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        indent = depth if indent is None else indent
        key, sep, text = line.strip().partition(":")
        if depth == indent and sep and key.isidentifier():
            name, entries[key] = key, text.strip()
        elif name is not None:  # a continuation line of the current entry
            entries[name] += " " + line.strip()
    return {key: text.split(". ")[0].rstrip(".") for key, text in entries.items()}


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line doc, from the most derived class that documents it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls) if f.init}


def field_defaults(cls: type) -> dict[str, Any]:
    """Each init field's default value (``...`` where it has none)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.init:
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
            else:
                defaults[f.name] = ...
    return defaults


def _optional_dataclass(tp: Any) -> type | None:
    """``X`` for an annotation ``X | None`` (or ``X``) where ``X`` is a dataclass."""
    if dataclasses.is_dataclass(tp):
        return tp
    real = [a for a in typing.get_args(tp) if a is not type(None)]
    return real[0] if len(real) == 1 and dataclasses.is_dataclass(real[0]) else None


def describe_fields(cls: type, *, prefix: str = "", values: dict[str, Any] | None = None) -> list[str]:
    """Lines ``name=default    doc`` for every field of ``cls``; a nested config's fields follow its own line
    as ``name.field=default`` (with the values the outer default gives them)."""
    lines = []
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    defaults = field_defaults(cls) if values is None else values
    for name, default in defaults.items():
        nested = _optional_dataclass(hints.get(name))
        if nested is not None and isinstance(default, nested):
            head = f"{prefix}{name}.*"  # a section: its fields follow
        else:
            head = f"{prefix}{name}=" + ("(required)" if default is ... else json.dumps(default, default=str))
        doc = docs.get(name) or _type_name(hints.get(name, Any))
        lines.append(f"  {head:<34} {doc}" if len(head) < 34 else f"  {head}\n  {'':<34} {doc}")
        if nested is not None:
            inner = {k: getattr(default, k) for k in field_defaults(nested)} if isinstance(default, nested) else None
            lines += describe_fields(nested, prefix=f"{prefix}{name}.", values=inner)
    return lines
