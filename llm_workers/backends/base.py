"""The backend interface and its registry: errors, `Generation`, `Backend`, `register`/`create`.

Backends register a factory `Settings -> Backend` under a name (`@register("name")`); a
`module:callable` value of LIBER_LLM_BACKEND loads a factory from anywhere else. The package
(`llm_workers/backends/__init__.py`) imports the built-in backends so their names are known.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from llm_workers.prompts import ChatPrompt


class LLMError(RuntimeError):
    """A generation call failed; the caller retries and finally dead-letters."""


class LLMTimeout(LLMError):
    """A generation call ran past its time limit."""


class BackendError(ValueError):
    """The configured backend cannot be created (unknown name, missing package or model)."""


@dataclass(frozen=True)
class Generation:
    text: str            # the answer after the prefix, special tokens removed
    tokens_in: int       # prompt tokens, chat template included, padding excluded
    tokens_out: int      # generated tokens, end-of-sequence included
    seconds: float       # wall time of the call that produced it (shared by its batch)
    finished: bool = True  # False when cut by max_new_tokens


def as_chat(prompt: ChatPrompt | str) -> ChatPrompt:
    return prompt if isinstance(prompt, ChatPrompt) else ChatPrompt("", prompt)


def call_prompts(prompts, closing) -> list[ChatPrompt]:
    """A call's prompts as chat prompts; LLMError when there are some and the backend is closing
    (`closing`, a threading.Event set by close())."""
    chats = [as_chat(p) for p in prompts]
    if chats and closing.is_set():
        raise LLMError("backend closed")
    return chats


class Backend:
    """Base class: one model, greedy decoding, batched calls."""
    name = "base"
    model = ""

    def generate(self, prompts: Sequence[ChatPrompt | str], max_new_tokens: int, *,
                 timeout_s: float | None = None) -> list[Generation]:
        raise NotImplementedError

    def count_tokens(self, prompt: ChatPrompt | str) -> int:
        raise NotImplementedError

    def count_tokens_many(self, prompts: Sequence[ChatPrompt | str]) -> list[int]:
        return [self.count_tokens(p) for p in prompts]

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[[object], Backend]] = {}


def register(name: str):
    def wrap(factory: Callable[[object], Backend]):
        BACKENDS[name] = factory
        return factory
    return wrap


# Registered when their module is first imported, which `create` does on first use: importing
# them up front would cost every caller the vLLM import check for nothing.
LAZY = {"vllm": "llm_workers.backends.vllm", "vllm-server": "llm_workers.backends.vllm_server"}


def create(settings) -> Backend:
    """The backend named by settings.llm_backend (`auto`: see resolve)."""
    settings = resolve(settings)
    name = settings.llm_backend
    if name in LAZY:
        importlib.import_module(LAZY[name])
    if name in BACKENDS:
        return BACKENDS[name](settings)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise BackendError(f"LIBER_LLM_BACKEND={name!r}: cannot load {exc}") from None
        return factory(settings)
    raise BackendError(f"LIBER_LLM_BACKEND={name!r}: unknown backend; known: "
                       f"{', '.join(sorted(BACKENDS))} or module:factory")


def bf16_is_fast(device: str = "cpu") -> bool:
    """bfloat16 matmuls in hardware: a GPU, or a CPU with AMX (Intel Sapphire Rapids and
    later) or AVX-512 BF16 instructions (AMD Zen 4 and later)."""
    if device.startswith("cuda"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


AUTO = "auto"
# prompts per call that fill the engine: vLLM batches continuously (64 measured best here);
# transformers pads a call to its longest prompt, so more than 16 buys little on a CPU
AUTO_BATCH = {"vllm": 64, "vllm-server": 64, "transformers": 16}
# a vLLM KV cache that holds a whole call of ~600-token prompts (512 MiB held about 40)
AUTO_KV_CACHE_MB = 2048


def resolve(settings):
    """The settings with every `auto` LLM value decided for this machine: the backend is
    vLLM's engine (continuous batching) when vLLM is installed, else transformers; the dtype
    bfloat16 where it is fast in hardware (bf16_is_fast), else float32; llm_batch_size 0 the
    backend's AUTO_BATCH; an automatic vLLM gets a KV cache of at least AUTO_KV_CACHE_MB.
    Values set explicitly are kept."""
    import importlib.util
    changes = {}
    backend = settings.llm_backend
    if backend == AUTO:
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
        changes["llm_backend"] = backend
        if backend == "vllm":
            changes["llm_vllm_kv_cache_mb"] = max(settings.llm_vllm_kv_cache_mb,
                                                  AUTO_KV_CACHE_MB)
    if settings.llm_dtype == AUTO:
        changes["llm_dtype"] = "bfloat16" if bf16_is_fast(settings.llm_device) else "float32"
    if settings.llm_batch_size == 0:
        changes["llm_batch_size"] = AUTO_BATCH.get(backend, 8)
    return settings.replace(**changes) if changes else settings


def fastest(settings):
    """The settings with the fastest configuration this machine runs (resolve's choices),
    whatever the settings' own backend and dtype."""
    return resolve(settings.replace(llm_backend=AUTO, llm_dtype=AUTO))
