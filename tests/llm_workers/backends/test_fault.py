"""The fault backend around the real transformers backend, and the registry's names."""
from __future__ import annotations

import pytest

from core.settings import Settings
from llm_workers import backends, prompts
from llm_workers.prompts import Activity


def test_failure_injector_and_registry(backend):
    failing = backends.FaultyBackend(backend, fail_marker="POISON", fail_first=1)
    p = prompts.cascade_prompt([Activity("Heat (1995)", "rate", 5.0)], context=None,
                               context_kind=prompts.CONTEXT_NONE)
    with pytest.raises(backends.LLMError, match="call 1"):
        failing.generate([p], 4)
    assert len(failing.generate([p], 4)) == 1
    poison = prompts.cascade_prompt([Activity("POISON (1995)", "rate", 5.0)], context=None,
                                    context_kind=prompts.CONTEXT_NONE)
    with pytest.raises(backends.LLMError, match="POISON"):
        failing.generate([p, poison], 4)
    with pytest.raises(backends.BackendError, match="LIBER_LLM_BACKEND"):
        backends.create(Settings.load(env={}, llm_backend="nope"))
    assert {"transformers", "failing"} <= set(backends.BACKENDS)
