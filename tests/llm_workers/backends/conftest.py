"""The real transformers backend (SmolLM2-135M-Instruct), loaded once for the backend tests."""
from __future__ import annotations

import pytest

from core.settings import Settings
from llm_workers import backends


@pytest.fixture(scope="session")
def backend():
    b = backends.create(Settings.load(env={}, llm_threads=1))
    yield b
    b.close()
