"""A backend for tests and fault drills: wraps a real one and injects errors, timeouts, slowness.

Two registered names build it:

    failing   the transformers backend; the first LIBER_LLM_FAIL_FIRST calls fail, and so does
              every call whose batch holds a prompt containing LIBER_LLM_FAIL_MARKER (a poison
              partition: it fails on every try, alone or in a batch)
    faulty    (also `LIBER_LLM_BACKEND=llm_workers.backends.fault:create`) the backend named by
              `LIBER_FAULT_INNER` (default `transformers`), with faults from the environment,
              so a drill can start an unmodified `liber llm-worker`:

    LIBER_FAULT_ERROR_EVERY=N     every Nth call raises LLMError (0: never)
    LIBER_FAULT_TIMEOUT_EVERY=N   every Nth call waits LIBER_FAULT_TIMEOUT_S, then LLMTimeout
    LIBER_FAULT_DELAY_S=S         every call first sleeps S seconds (a slow model or endpoint)
    LIBER_FAULT_HANG_EVERY=N      every Nth call ignores its time limit: it holds until the
                                  backend closes (a stuck endpoint) or `release()` lets it go on
    LIBER_FAULT_EMPTY_EVERY=N     every Nth call answers each prompt with an empty text
                                  (a malformed answer)
    LIBER_FAULT_SHORT_EVERY=N     every Nth call returns one answer fewer than its prompts

A call picked for several faults gets the first of: first calls, marker, hang, timeout, error,
empty, short.
"""
from __future__ import annotations

import dataclasses
import os
import threading

from llm_workers.backends.base import (Backend, BackendError, LLMError, LLMTimeout, as_chat,
                                       create as create_backend, register)
from llm_workers.backends.transformers import _transformers


class WrappingBackend(Backend):
    """A backend around a real one: token counting and closing go to the inner backend;
    subclasses change `generate` (fault injection for tests and `liber chaos`)."""

    def __init__(self, inner: Backend, prefix: str):
        self.inner = inner
        self.name = f"{prefix}+{inner.name}"
        self.model = inner.model
        self.calls = 0

    def count_tokens(self, prompt):
        return self.inner.count_tokens(prompt)

    def count_tokens_many(self, prompts):
        return self.inner.count_tokens_many(prompts)

    def close(self):
        self.inner.close()


class FaultyBackend(WrappingBackend):
    """Wraps a real backend and makes chosen calls fail, hang, or answer badly.

    Args:
        inner: the backend that answers the calls not failed.
        fail_first: the first N calls of the process raise LLMError (transient failures).
        fail_marker: a call whose batch holds a prompt containing it raises LLMError.
        error_every, timeout_every, hang_every, empty_every, short_every: every Nth call
            gets that fault (0: never); see the module's docstring.
        timeout_s: how long an injected timeout holds (at most the call's own limit).
        delay_s: every call first sleeps this long.
        prefix: the start of `name` (`failing+transformers`, `faulty+transformers`).
    """

    def __init__(self, inner: Backend, *, fail_first: int = 0, fail_marker: str = "",
                 error_every: int = 0, timeout_every: int = 0, timeout_s: float = 2.0,
                 delay_s: float = 0.0, hang_every: int = 0, empty_every: int = 0,
                 short_every: int = 0, prefix: str = "faulty"):
        super().__init__(inner, prefix)
        self.fail_first, self.fail_marker = fail_first, fail_marker
        self.error_every, self.timeout_every = error_every, timeout_every
        self.timeout_s, self.delay_s = timeout_s, delay_s
        self.hang_every, self.empty_every, self.short_every = hang_every, empty_every, short_every
        self._closed = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()  # calls may overlap (llm_concurrency > 1)

    def generate(self, prompts, max_new_tokens, *, timeout_s=None):
        with self._lock:
            self.calls += 1
            call = self.calls
        if call <= self.fail_first:
            raise LLMError(f"injected failure: call {call} of the first {self.fail_first}")
        if self.fail_marker and any(self.fail_marker in as_chat(p).user for p in prompts):
            raise LLMError(f"injected failure: prompt contains {self.fail_marker!r}")
        if self.delay_s and self._closed.wait(self.delay_s):
            raise LLMError("backend closed")
        if self.hang_every and call % self.hang_every == 0:
            self._released.wait()
            if self._closed.is_set():
                raise LLMError(f"injected hang: call {call} ended by close")
        if self.timeout_every and call % self.timeout_every == 0:
            wait = min(self.timeout_s, timeout_s or self.timeout_s)
            self._closed.wait(wait)
            raise LLMTimeout(f"injected timeout: call {call} held for {wait:.1f}s")
        if self.error_every and call % self.error_every == 0:
            raise LLMError(f"injected error: call {call}")
        answers = self.inner.generate(prompts, max_new_tokens, timeout_s=timeout_s)
        if self.empty_every and call % self.empty_every == 0:
            return [dataclasses.replace(a, text="") for a in answers]
        if self.short_every and call % self.short_every == 0:
            return answers[:-1]
        return answers

    def release(self) -> None:
        """Held calls (and later ones picked to hang) go on to the inner backend."""
        self._released.set()

    def close(self):
        self._closed.set()  # wake a held call first
        self._released.set()
        super().close()


@register("failing")
def _failing(settings) -> Backend:
    return FaultyBackend(_transformers(settings), fail_marker=settings.llm_fail_marker,
                         fail_first=settings.llm_fail_first, prefix="failing")


def _env_number(name: str, kind, default):
    raw = os.environ.get(name, "")
    try:
        return kind(raw) if raw else default
    except ValueError:
        raise BackendError(f"{name}={raw!r}: must be a number") from None


@register("faulty")
def create(settings) -> Backend:
    inner_name = os.environ.get("LIBER_FAULT_INNER", "transformers")
    if inner_name in ("faulty", "llm_workers.backends.fault:create"):
        raise BackendError("LIBER_FAULT_INNER must name another backend")
    inner = create_backend(settings.replace(llm_backend=inner_name))
    return FaultyBackend(inner, error_every=_env_number("LIBER_FAULT_ERROR_EVERY", int, 0),
                         timeout_every=_env_number("LIBER_FAULT_TIMEOUT_EVERY", int, 0),
                         timeout_s=_env_number("LIBER_FAULT_TIMEOUT_S", float, 2.0),
                         delay_s=_env_number("LIBER_FAULT_DELAY_S", float, 0.0),
                         hang_every=_env_number("LIBER_FAULT_HANG_EVERY", int, 0),
                         empty_every=_env_number("LIBER_FAULT_EMPTY_EVERY", int, 0),
                         short_every=_env_number("LIBER_FAULT_SHORT_EVERY", int, 0))
