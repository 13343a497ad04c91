"""The first code of every sandbox child process: ``python -I -S -B -c <this file's text> <fd>``.

The parent (:mod:`dare_gym.rewards.sandbox`) writes to a memory file (memfd), read here from ``fd``:
the name of a package to create, the compiled code of the modules to put in it (its own
:mod:`~dare_gym.rewards.sandbox_protocol`, :mod:`~dare_gym.rewards.sandbox_harness` or
:mod:`~dare_gym.rewards.code_checker`), which function to run (``module`` for its ``main``, or
``module:function``), and its input. The child thus runs
the same modules that tests import, without importing ``dare_gym`` (and torch) or finding files on disk: the
program's process may not be able to read the project's folder at all. The modules' relative imports
(``from . import sandbox_protocol``) resolve inside the package made here.
"""

import marshal
import sys
import types


def main() -> None:
    with open(int(sys.argv[1]), "rb") as stream:
        package_name, modules, entry, payload = marshal.load(stream)
    package = types.ModuleType(package_name)
    package.__path__ = []
    sys.modules[package_name] = package
    for name, code in modules:
        module = types.ModuleType(f"{package_name}.{name}")
        module.__package__ = package_name
        module.__file__ = code.co_filename
        sys.modules[module.__name__] = module
        setattr(package, name, module)
        exec(code, module.__dict__)
    module_name, _, function = entry.partition(":")
    getattr(sys.modules[f"{package_name}.{module_name}"], function or "main")(payload)


if __name__ == "__main__":
    main()
