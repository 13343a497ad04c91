"""User modules named in configs: import by name (the current directory too) or by .py path, and
`module:qualname` references that a saved config uses to re-create callables."""

from __future__ import annotations

import sys

import pytest

from dare_gym.core.config import ConfigError
from dare_gym.train.user_code import (
    import_module,
    is_reference,
    jsonable,
    reference_of,
    resolve_reference,
    resolve_reward_spec,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh current directory that is not on sys.path, as for the dare-gym console script."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in [n for n, m in sys.modules.items() if str(tmp_path) in str(getattr(m, "__file__", "") or "")]:
        del sys.modules[name]


def test_a_module_in_the_current_directory_and_a_file_by_path(workdir):
    (workdir / "uc_rewards_a.py").write_text("def exact(completion, sample):\n    return 1.0\n")
    (workdir / "sub").mkdir()
    (workdir / "sub" / "uc_rewards_b.py").write_text("class Scores:\n    @staticmethod\n    def half(c, s):\n        return 0.5\n")
    assert import_module("uc_rewards_a").exact("x", {}) == 1.0
    module = import_module("sub/uc_rewards_b.py")
    assert module.Scores.half("x", {}) == 0.5 and import_module(str(workdir / "sub" / "uc_rewards_b.py")) is module
    assert resolve_reference("uc_rewards_a:exact") is sys.modules["uc_rewards_a"].exact
    assert resolve_reference("sub/uc_rewards_b.py:Scores.half") is module.Scores.half
    # references record how another process, started anywhere, finds the callable: an installed module's name, or
    # the file's absolute path (a module found in the current directory too, so a resume from elsewhere finds it)
    assert reference_of(sys.modules["uc_rewards_a"].exact) == f"{workdir / 'uc_rewards_a.py'}:exact"
    assert reference_of(module.Scores.half) == f"{workdir / 'sub' / 'uc_rewards_b.py'}:Scores.half"
    spec = resolve_reward_spec([["uc_rewards_a:exact", 1.0], ["format", 0.1]])
    assert spec == [[sys.modules["uc_rewards_a"].exact, 1.0], ["format", 0.1]]
    assert jsonable({"reward": spec}) == {"reward": [[f"{workdir / 'uc_rewards_a.py'}:exact", 1.0], ["format", 0.1]]}


@pytest.mark.parametrize("source,spec,message", [
    (None, "uc_missing", "no module named 'uc_missing' on sys.path or in the current directory"),
    (None, "nowhere/uc_file.py", "no such file"),
    ("def f(:\n", "uc_syntax", "importing 'uc_syntax' failed: SyntaxError"),
    ("import uc_not_installed_dep\n", "uc_dep", "importing 'uc_dep' failed: ModuleNotFoundError: No module named "
                                                "'uc_not_installed_dep'"),
    ("x = 1 / 0\n", "uc_zero", "importing 'uc_zero' failed: ZeroDivisionError: division by zero (" ),
])
def test_import_errors_name_the_module_and_the_cause(workdir, source, spec, message):
    if source is not None:
        (workdir / f"{spec}.py").write_text(source)
    with pytest.raises(ConfigError, match="^--import x: ") as error:
        import_module(spec, where="--import x")
    assert message in str(error.value)


def test_bad_references_say_what_is_wrong(workdir):
    (workdir / "uc_refs.py").write_text("def exact(c, s):\n    return 1.0\n\ndef _private(c, s):\n    return 0.0\n")
    with pytest.raises(ConfigError, match="has no attribute 'exct'; its functions: exact$"):
        resolve_reference("uc_refs:exct", where="env_kwargs.reward")
    with pytest.raises(ConfigError, match="lambda or a function defined inside another function"):
        resolve_reference("uc_refs:make.<locals>.inner")
    (workdir / "math.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="a different module of that name is already loaded"):
        import_module("math.py")
    assert is_reference("my_rewards:exact") and not is_reference("math_verify") and not is_reference("a:")
