"""An OpenAI-compatible vLLM server by URL (`vllm-server`, `LIBER_LLM_URL`).

`LIBER_LLM_URL` of a `vllm serve` (or any server speaking vLLM's OpenAI dialect):
`/v1/chat/completions` with the answer's prefix as the final assistant message
(`continue_final_message`), `/tokenize` for token counts. The batch's prompts are sent at once
and the server batches them. The labelled lines are kept by structured output with the regex of
`llm_workers.backends.vllm.line_regex`, as for the in-process engine.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm_workers.backends.base import (Backend, BackendError, Generation, LLMError, LLMTimeout,
                                       as_chat, call_prompts, register)
from llm_workers.backends.vllm import line_regex, messages
from llm_workers.prompts import ChatPrompt


class VLLMServerBackend(Backend):
    """A vLLM OpenAI-compatible server by URL (`vllm serve MODEL`)."""
    name = "vllm-server"

    def __init__(self, url: str, model: str | None = None, *, repetition_penalty: float = 1.0,
                 guide: bool = True, max_parallel: int = 16, api_key: str = ""):
        if not url.startswith(("http://", "https://")):
            raise BackendError(f"LIBER_LLM_URL={url!r}: must be an http(s) URL")
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.repetition_penalty = repetition_penalty
        self.guide = guide
        self.api_key = api_key
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="vllm-http")
        self._closing = threading.Event()
        try:
            served = [m["id"] for m in self._call("GET", "/v1/models", None, 30)["data"]]
        except LLMError as exc:
            raise BackendError(f"LIBER_LLM_URL={url!r}: {exc}") from None
        if model and model in served:
            self.served = model
        elif model and Path(model).name in [Path(s).name for s in served]:
            self.served = served[[Path(s).name for s in served].index(Path(model).name)]
        else:
            self.served = served[0]
        self.model = Path(self.served).name

    def _call(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise LLMError(f"{path}: HTTP {exc.code}: {detail}") from None
        except TimeoutError:
            raise LLMTimeout(f"{path}: no answer within {timeout:.1f}s") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if "timed out" in str(exc):
                raise LLMTimeout(f"{path}: no answer within {timeout:.1f}s") from None
            raise LLMError(f"{path}: {exc}") from None

    def _messages(self, prompt: ChatPrompt) -> list[dict]:
        out = messages(prompt)
        if prompt.prefix:   # the answer starts with the first label, as with the other backends
            out.append({"role": "assistant", "content": prompt.prefix})
        return out

    def count_tokens(self, prompt):
        prompt = as_chat(prompt)
        body = {"model": self.served, "messages": self._messages(prompt)}
        body.update({"continue_final_message": True, "add_generation_prompt": False}
                    if prompt.prefix else {"add_generation_prompt": True})
        return int(self._call("POST", "/tokenize", body, 60)["count"])

    def count_tokens_many(self, prompts):
        return list(self._pool.map(self.count_tokens, prompts))

    def _one(self, prompt: ChatPrompt, max_new_tokens: int, timeout: float) -> dict:
        body = {"model": self.served, "messages": self._messages(prompt),
                "max_tokens": max_new_tokens, "temperature": 0.0,
                "repetition_penalty": self.repetition_penalty, "skip_special_tokens": True}
        body.update({"continue_final_message": True, "add_generation_prompt": False}
                    if prompt.prefix else {"add_generation_prompt": True})
        regex = line_regex(prompt, max_new_tokens) if self.guide else None
        if regex:
            body["structured_outputs"] = {"regex": regex}
        return self._call("POST", "/v1/chat/completions", body, timeout)

    def generate(self, prompts, max_new_tokens, *, timeout_s=None):
        prompts = call_prompts(prompts, self._closing)
        if not prompts:
            return []
        start = time.perf_counter()
        timeout = timeout_s or 600.0
        futures = [self._pool.submit(self._one, p, max_new_tokens, timeout) for p in prompts]
        answers = [f.result() for f in futures]   # LLMError / LLMTimeout propagate
        seconds = time.perf_counter() - start
        out = []
        for answer in answers:
            choice, usage = answer["choices"][0], answer.get("usage") or {}
            out.append(Generation(text=choice["message"].get("content") or "",
                                  tokens_in=int(usage.get("prompt_tokens", 0)),
                                  tokens_out=int(usage.get("completion_tokens", 0)),
                                  seconds=seconds, finished=choice.get("finish_reason") == "stop"))
        if timeout_s and seconds >= timeout_s and not all(g.finished for g in out):
            raise LLMTimeout(f"generation passed {timeout_s}s ({seconds:.1f}s)")
        return out

    def close(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


@register("vllm-server")
def _vllm_server(settings) -> Backend:
    if not settings.llm_url:
        raise BackendError("LIBER_LLM_BACKEND=vllm-server needs LIBER_LLM_URL (http://host:port)")
    model = None if settings.llm_model == "smollm2-135m-instruct" else settings.llm_model
    return VLLMServerBackend(settings.llm_url, model,
                             repetition_penalty=settings.llm_repetition_penalty,
                             max_parallel=max(1, settings.llm_batch_size))
