"""User code named in configs: modules to import and ``module:function`` references.

A config names user code in two ways, both plain strings so that a saved config can re-create the run:

* ``imports: [my_rewards, path/to/plugins.py]`` (``--import`` on the command line): modules imported before
  the config is checked, so that the rewards, envs and algorithms they register can be named in it;
* ``env_kwargs: {reward: my_rewards:exact}``: a ``module:qualname`` reference to a reward callable, also
  inside weighted lists (``[[my_rewards:exact, 1.0], [format, 0.1]]``).

A module is a dotted module name, looked up on ``sys.path`` and then in the current directory (as
``python -m`` would find it), or the path of a ``.py`` file, imported under its file name. Callables passed
from Python are recorded as references by :func:`jsonable` when a config is saved.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from dare_gym.core.config import ConfigError

_FILE_MODULES: dict[str, str] = {}  # module name -> absolute path, for modules imported from a .py file


def is_file_spec(spec: str) -> bool:
    return spec.endswith(".py")


def normalize_module_spec(spec: str) -> str:
    """A ``.py`` path made absolute (so that another process, or a resume elsewhere, finds the same file);
    a module name unchanged."""
    return str(Path(spec).expanduser().resolve()) if isinstance(spec, str) and is_file_spec(spec) else spec


def import_module(spec: str, *, where: str = "import") -> ModuleType:
    """Import a module by dotted name or ``.py`` path; a failure raises :class:`ConfigError` naming ``where``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{where}: expected a module name or a .py file path, got {spec!r}")
    if is_file_spec(spec):
        return _import_file(Path(spec).expanduser().resolve(), where)
    return _import_name(spec, where)


def _import_name(name: str, where: str) -> ModuleType:
    cwd = os.getcwd()
    importlib.invalidate_caches()  # a file written since the last import is found
    for first_try in (True, False):
        try:
            module = importlib.import_module(name)
            found = Path(getattr(module, "__file__", None) or "/")
            if "." not in name and found.parent == Path(cwd).resolve() and found.suffix == ".py":
                # found in the current directory: a saved config names its file, so that a run resumed from
                # another folder imports the same one
                _FILE_MODULES.setdefault(name, str(found))
            return module
        except ModuleNotFoundError as error:
            if not (error.name and (name == error.name or name.startswith(error.name + "."))):
                raise _import_error(name, where, error) from None  # the module imports something missing
            if first_try and cwd not in sys.path and "" not in sys.path:
                # Look in the current directory, as ``python -m`` would (a console script's sys.path starts
                # with its own bin folder instead); appended, so that installed packages keep precedence.
                sys.path.append(cwd)
                continue
            raise ConfigError(f"{where}: no module named {name!r} on sys.path or in the current directory "
                              f"({cwd}); to import a file, give its path, e.g. path/to/{name.split('.')[-1]}.py"
                              ) from None
        except Exception as error:  # noqa: BLE001 - the user's module failed while importing
            raise _import_error(name, where, error) from None
    raise AssertionError("unreachable")


def _import_file(path: Path, where: str) -> ModuleType:
    name = path.stem
    if not path.is_file():
        raise ConfigError(f"{where}: no such file {str(path)!r}")
    if not name.isidentifier():
        raise ConfigError(f"{where}: {path.name!r} cannot be imported: its name must be a Python identifier")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return loaded
        raise ConfigError(f"{where}: cannot import {str(path)!r} as module {name!r}: a different module of that "
                          f"name is already loaded ({getattr(loaded, '__file__', None) or 'built in'}); rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as a normal import does (dataclasses, pickling look it up)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file failed while importing
        del sys.modules[name]
        raise _import_error(str(path), where, error) from None
    _FILE_MODULES[name] = str(path)
    return module


def _import_error(what: str, where: str, error: BaseException) -> ConfigError:
    location = ""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(error, SyntaxError) and error.filename:
        location = f" ({error.filename}, line {error.lineno})"
    elif tb is not None:
        location = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})"
    return ConfigError(f"{where}: importing {what!r} failed: {type(error).__name__}: {error}{location}")


def is_reference(value: Any) -> bool:
    """Whether ``value`` looks like a ``module:qualname`` reference (registered reward names have no colon)."""
    if not isinstance(value, str) or ":" not in value:
        return False
    module, _, qualname = value.rpartition(":")
    return bool(module) and bool(qualname)


def resolve_reference(reference: str, *, where: str = "reference") -> Any:
    """The object a ``module:qualname`` reference names; errors name ``where`` and what the module offers."""
    module_spec, _, qualname = reference.rpartition(":")
    if module_spec == "__main__" and not hasattr(sys.modules["__main__"], qualname.split(".")[0]):
        raise ConfigError(f"{where}: {reference!r} was defined in a script run directly; move it to a module "
                          "(e.g. my_rewards.py) to name it from the command line or a resumed run")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigError(f"{where}: {reference!r} names a lambda or a function defined inside another function, "
                          "which cannot be imported again; define it at the top level of a module")
    module = import_module(module_spec, where=where)
    target: Any = module
    for part in qualname.split("."):
        if not hasattr(target, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                            and getattr(v, "__module__", None) == module.__name__)
            raise ConfigError(f"{where}: module {module_spec!r} has no attribute {qualname!r}; "
                              f"its functions: {', '.join(public) or 'none'}")
        target = getattr(target, part)
    return target


def reference_of(obj: Callable) -> str:
    """``module:qualname`` for a function or class (the file's path for a module imported by path), so that
    another process can import it again. One defined in the script being run is recorded as
    ``__main__:name``, which only that script can resolve (importing a script would run it again)."""
    module_name = getattr(obj, "__module__", None) or "__main__"
    qualname = getattr(obj, "__qualname__", None) or getattr(type(obj), "__qualname__", repr(obj))
    return f"{_FILE_MODULES.get(module_name, module_name)}:{qualname}"


def resolve_reward_spec(spec: Any, *, where: str = "reward") -> Any:
    """A reward spec with its ``module:qualname`` references replaced by the callables they name; registered
    names, callables and weights pass through unchanged (the env checks them)."""
    from dare_gym.rewards import list_rewards

    if is_reference(spec) and spec not in list_rewards():
        return resolve_reference(spec, where=where)
    if isinstance(spec, (list, tuple)):
        return [
            [resolve_reward_spec(item[0], where=f"{where}[{i}]"), *item[1:]] if isinstance(item, (list, tuple))
            else resolve_reward_spec(item, where=f"{where}[{i}]")
            for i, item in enumerate(spec)
        ]
    return spec


def located_references(spec: Any) -> Any:
    """A reward spec with each ``module:qualname`` reference to a module found in the current directory made
    ``/its/file.py:qualname`` (call after the references are resolved), so that a saved config re-creates the
    same reward from any folder."""
    if isinstance(spec, str) and is_reference(spec):
        module, _, qualname = spec.rpartition(":")
        return f"{_FILE_MODULES[module]}:{qualname}" if module in _FILE_MODULES else spec
    if isinstance(spec, (list, tuple)):
        return [located_references(item) for item in spec]
    return spec


def resolve_env_kwargs(kwargs: dict, *, where: str = "env_kwargs") -> dict:
    """``kwargs`` for ``dare_gym.make`` with a ``reward`` reference resolved to its callable."""
    if "reward" not in kwargs:
        return dict(kwargs)
    return {**kwargs, "reward": resolve_reward_spec(kwargs["reward"], where=f"{where}.reward")}


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: callables become ``module:qualname`` references, a combined reward its
    weighted list, paths strings; anything else unknown its ``repr``."""
    from dare_gym.rewards import CombinedReward, get_reward, list_rewards

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, CombinedReward):
        return [[name if name in list_rewards() and get_reward(name) is fn else reference_of(fn), weight]
                for name, fn, weight in value.terms]
    if callable(value):
        return reference_of(value)
    return repr(value)
