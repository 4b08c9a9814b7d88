"""The test suite's two speeds.

``python3 -m pytest -q`` on a developer's machine runs the fast suite: every test except those
marked ``slow`` (long load ramps, accuracy runs against real engines, fresh-venv installs).
Under ``CI=true`` (``.ci/run``), or with ``RIGHTSIZER_SLOW=1``, the same command runs them all.
Tests that need the real vLLM / llama-server backends skip when those are not installed, and
fail under ``CI=true`` (``tests/integration/conftest.py``).
"""

from __future__ import annotations

import os

import pytest


def run_slow() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("RIGHTSIZER_SLOW") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if run_slow():
        return
    skip = pytest.mark.skip(reason="slow: runs under CI=true or with RIGHTSIZER_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
