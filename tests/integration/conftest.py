"""Session fixtures that run the real backends from ``.ci/install_backends.sh``'s cache.

A test that takes ``vllm_server`` or ``llama_server`` is marked ``real_backend``. When a
backend is not installed the test is skipped, except under ``CI=true``, where it fails:
CI must not go green by skipping.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.real_backends import (
    RunningServer,
    llama_available,
    require,
    start_llama_server,
    start_vllm,
    vllm_available,
)

_REAL_BACKEND_FIXTURES = frozenset({"vllm_server", "llama_server", "require_vllm", "require_llama"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _REAL_BACKEND_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_backend)


def _require(reason: str | None) -> None:
    require(reason, "a real backend is missing")


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[RunningServer]:
    """vLLM CPU serving the tiny model as ``tiny-vllm``, prefix caching on."""
    _require(vllm_available())
    with start_vllm() as server:
        yield server


@pytest.fixture(scope="session")
def llama_server() -> Iterator[RunningServer]:
    """llama-server serving tiny.gguf as ``tiny-llama``: 4 slots sharing 8192 tokens."""
    _require(llama_available())
    with start_llama_server() as server:
        yield server


@pytest.fixture
def require_vllm() -> None:
    """For tests that start their own vLLM: skip (or fail under CI) if it is missing."""
    _require(vllm_available())


@pytest.fixture
def require_llama() -> None:
    """For tests that start their own llama-server: skip (or fail under CI) if missing."""
    _require(llama_available())
