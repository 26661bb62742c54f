"""`auto` LLM settings (the defaults) decided for the machine: backend, dtype, calls' size."""
from __future__ import annotations

import importlib.util

import pytest

from core.settings import Settings, SettingsError
from llm_workers.backends import base


@pytest.fixture
def machine(monkeypatch):
    """Set what the machine has: `machine(vllm=..., bf16=...)`."""
    def set_to(*, vllm: bool, bf16: bool):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if vllm else None) if name == "vllm"
                            else real(name, *a))
        monkeypatch.setattr(base, "bf16_is_fast", lambda device="cpu": bf16)
    return set_to


def test_defaults_are_auto_and_resolve_to_vllm_bfloat16_and_full_calls(machine):
    defaults = Settings.load(env={})
    assert (defaults.llm_backend, defaults.llm_dtype, defaults.llm_batch_size) == ("auto", "auto", 0)
    machine(vllm=True, bf16=True)
    chosen = base.resolve(defaults)
    assert (chosen.llm_backend, chosen.llm_dtype, chosen.llm_batch_size) == ("vllm", "bfloat16", 64)
    assert chosen.llm_vllm_kv_cache_mb >= base.AUTO_KV_CACHE_MB
    assert base.resolve(chosen) == chosen  # nothing left to decide


def test_without_vllm_or_fast_bfloat16_auto_is_transformers_float32(machine):
    machine(vllm=False, bf16=False)
    chosen = base.resolve(Settings.load(env={}))
    assert (chosen.llm_backend, chosen.llm_dtype, chosen.llm_batch_size) == (
        "transformers", "float32", 16)
    assert chosen.llm_vllm_kv_cache_mb == Settings.load(env={}).llm_vllm_kv_cache_mb


def test_explicit_values_are_kept_and_fastest_overrides_backend_and_dtype(machine):
    machine(vllm=True, bf16=True)
    mine = Settings.load(env={}, llm_backend="transformers", llm_dtype="float16",
                         llm_batch_size=4)
    assert base.resolve(mine) == mine
    fast = base.fastest(mine)
    assert (fast.llm_backend, fast.llm_dtype, fast.llm_batch_size) == ("vllm", "bfloat16", 4)
    with pytest.raises(SettingsError, match="LIBER_LLM_DTYPE"):
        Settings.load(env={}, llm_dtype="int8")
