"""The real transformers backend (SmolLM2-135M-Instruct), loaded once for the backend tests."""
from __future__ import annotations

import pytest

from llm_workers import backends
from tests.conftest import base_settings


@pytest.fixture(scope="session")
def backend():
    b = backends.create(base_settings(llm_threads=1))
    yield b
    b.close()
