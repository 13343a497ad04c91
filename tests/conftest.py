"""Shared fixtures. Data-dependent tests read ../shared/data through DARE_GYM_DATA_DIR, and tests of real
checkpoint files ../shared/families through DARE_GYM_FAMILIES_DIR; where a folder is absent they skip with the
reason, except under CI (DARE_GYM_REQUIRE_DATA=1), where a missing folder is an error."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the suite starts subprocesses (trainers, ranks, sandboxes) that
# share 2 cores, and spinning workers slowed small forwards ~45x under that load. Set before torch is imported;
# the subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (the README's test command runs 2 workers) each worker computes with one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

# Files whose tests are independent, long and self-contained: xdist spreads them test by test over the workers.
# Every other file runs whole on one worker (--dist loadgroup), so its module-scoped fixtures (a comparison run,
# a torchrun job, a server) are built once.
SPREAD_FILES = {"test_algorithms_learn.py", "test_matrix.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def _data_dir() -> Path | None:
    value = os.environ.get("DARE_GYM_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if path is None:
        reason = f"DARE_GYM_DATA_DIR is unset or not a folder ({os.environ.get('DARE_GYM_DATA_DIR')!r})"
        if os.environ.get("DARE_GYM_REQUIRE_DATA") == "1":
            pytest.fail(f"benchmark data required in CI: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def families_dir() -> Path:
    """``../shared/families`` (the real config, weight-name and tokenizer files of LLaDA, Dream, SDAR, LLaDA2),
    through DARE_GYM_FAMILIES_DIR; skipped with the reason where absent, an error under CI."""
    value = os.environ.get("DARE_GYM_FAMILIES_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    reason = f"DARE_GYM_FAMILIES_DIR is unset or not a folder ({value!r})"
    if os.environ.get("DARE_GYM_REQUIRE_DATA") == "1":
        pytest.fail(f"the real checkpoint files are required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_policy():
    import dare_gym

    return dare_gym.load_policy("tiny")
