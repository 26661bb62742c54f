"""An LLM backend for fault drills: wraps the real one and injects errors, timeouts, slowness.

Select it with `LIBER_LLM_BACKEND=liber.fault_backend:create` (or the registered name `faulty`
in a process that imported this module). What it injects comes from the environment, so a
drill can start an unmodified `liber llm-worker`:

    LIBER_FAULT_ERROR_EVERY=N     every Nth call raises LLMError (0: never)
    LIBER_FAULT_TIMEOUT_EVERY=N   every Nth call waits LIBER_FAULT_TIMEOUT_S, then LLMTimeout
    LIBER_FAULT_DELAY_S=S         every call first sleeps S seconds (a slow model or endpoint)

A call picked for both an error and a timeout times out. The inner backend is the one named
by `LIBER_FAULT_INNER` (default `transformers`, the real model).
"""
from __future__ import annotations

import os
import threading

from llm_workers import backends
from llm_workers.backends import Backend, LLMError, LLMTimeout, WrappingBackend


class FaultyBackend(WrappingBackend):
    def __init__(self, inner: Backend, *, error_every: int = 0, timeout_every: int = 0,
                 timeout_s: float = 2.0, delay_s: float = 0.0):
        super().__init__(inner, "faulty")
        self.error_every, self.timeout_every = error_every, timeout_every
        self.timeout_s, self.delay_s = timeout_s, delay_s
        self._closed = threading.Event()

    def generate(self, prompts, max_new_tokens, *, timeout_s=None):
        self.calls += 1
        call = self.calls
        if self.delay_s and self._closed.wait(self.delay_s):
            raise LLMError("backend closed")
        if self.timeout_every and call % self.timeout_every == 0:
            wait = min(self.timeout_s, timeout_s or self.timeout_s)
            self._closed.wait(wait)
            raise LLMTimeout(f"injected timeout: call {call} held for {wait:.1f}s")
        if self.error_every and call % self.error_every == 0:
            raise LLMError(f"injected error: call {call}")
        return self.inner.generate(prompts, max_new_tokens, timeout_s=timeout_s)

    def close(self):
        self._closed.set()  # wake a held call first
        super().close()


def _env_number(name: str, kind, default):
    raw = os.environ.get(name, "")
    try:
        return kind(raw) if raw else default
    except ValueError:
        raise backends.BackendError(f"{name}={raw!r}: must be a number") from None


def create(settings) -> Backend:
    inner_name = os.environ.get("LIBER_FAULT_INNER", "transformers")
    if inner_name in ("faulty", "liber.fault_backend:create"):
        raise backends.BackendError("LIBER_FAULT_INNER must name another backend")
    inner = backends.create(settings.replace(llm_backend=inner_name))
    return FaultyBackend(inner, error_every=_env_number("LIBER_FAULT_ERROR_EVERY", int, 0),
                         timeout_every=_env_number("LIBER_FAULT_TIMEOUT_EVERY", int, 0),
                         timeout_s=_env_number("LIBER_FAULT_TIMEOUT_S", float, 2.0),
                         delay_s=_env_number("LIBER_FAULT_DELAY_S", float, 0.0))


backends.register("faulty")(create)
