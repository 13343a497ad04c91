"""Packaging that cannot forget a subpackage or a data file.

The product's design card fixes four top-level folders that install as one namespace: ``dare_gym/`` is
``dare_gym``, and ``envs/``, ``rewards/`` and ``algorithms/`` are ``dare_gym.envs``, ``dare_gym.rewards`` and
``dare_gym.algorithms``. Every package below each of those roots is found by walking it (any folder with an
``__init__.py``), and every data file a package folder holds (configs, the built-in checkpoints, tokenizer
files) ships with it, so a new subpackage or checkpoint needs no line here. Project metadata and
dependencies are in ``pyproject.toml``; ``tests/test_packaging.py`` builds the wheel, installs it into a clean
virtual environment and runs it outside the checkout.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
ROOTS = {"dare_gym": "dare_gym", "dare_gym.envs": "envs", "dare_gym.rewards": "rewards",
         "dare_gym.algorithms": "algorithms"}
CODE_SUFFIXES = {".py", ".pyc", ".pyo"}


def discover_packages() -> list[str]:
    packages = []
    for name, folder in ROOTS.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]
    return sorted(packages)


def package_folder(package: str) -> Path:
    for name, folder in sorted(ROOTS.items(), key=lambda item: -len(item[0])):
        if package == name or package.startswith(name + "."):
            return HERE / folder / Path(*package[len(name):].lstrip(".").split(".")) if package != name else HERE / folder
    raise ValueError(package)


def discover_data(packages: list[str]) -> dict[str, list[str]]:
    """Each package's non-code files, in its folder and in sub-folders that are not packages themselves."""
    data = {}
    for package in packages:
        root = package_folder(package)
        files = []
        pending = [root]
        while pending:
            folder = pending.pop()
            for path in sorted(folder.iterdir()):
                if path.is_dir():
                    if path.name != "__pycache__" and not (path / "__init__.py").exists():
                        pending.append(path)
                elif path.suffix not in CODE_SUFFIXES:
                    files.append(path.relative_to(root).as_posix())
        if files:
            data[package] = sorted(files)
    return data


PACKAGES = discover_packages()
setup(packages=PACKAGES, package_dir=ROOTS, package_data=discover_data(PACKAGES))
