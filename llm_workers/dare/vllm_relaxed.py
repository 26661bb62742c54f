"""DARE's relaxed verification inside vLLM: a rejection sampler that also accepts a draft token
in the target's top-k whose probability exceeds a floor (defaults k=2, p=0.1), installed by a
worker subclass.

How it is installed (the hook is vLLM's `worker_cls`, one of its engine arguments):

    LLM(model, speculative_config={...custom_class...}, worker_cls=worker_class_name(),
        additional_config={CONFIG_KEY: {"top_k": 2, "min_prob": 0.1}})

`RelaxedCPUWorker` (on CPUs) / `RelaxedGPUWorker` (on CUDA) builds its model runner as usual,
then swaps the runner's `rejection_sampler` for `RelaxedRejectionSampler`.

The rule sits in `apply_logits_processors`, the sampler's step that turns the target logits of
the draft positions into the ones verification reads (penalties and processors applied). For a
greedy request, a draft token that passes the rule is raised to the row's top logit, so vLLM's
own greedy verification accepts it; a draft token that fails keeps the logits as they were, so
the first rejection takes the model's own argmax, as in our decoder (llm_workers/dare/decoder.py,
same rule: in the top k and probability > min_prob). Bonus tokens are sampled from other rows
and are not touched; sampling (non-greedy) requests are left to vLLM's lossless rule.

Tested against vLLM 0.32.0; tests/llm_workers/dare/test_vllm_hooks.py pins the signatures used
here.
"""
from __future__ import annotations

import torch

CONFIG_KEY = "liber_dare_relaxed"


def relaxed_accept(target_logits: torch.Tensor, draft_ids: torch.Tensor, top_k: int = 2,
                   min_prob: float = 0.1) -> torch.Tensor:
    """Per draft position: True when the draft token is in the top k of softmax(logits) and its
    probability exceeds min_prob. target_logits [n, vocab], draft_ids [n] -> bool [n].
    A negative id is vLLM's placeholder for a draft not proposed (seen after an aborted
    request): never accepted."""
    probs = torch.softmax(target_logits.float(), dim=-1)
    real = draft_ids >= 0
    ids = draft_ids.long().clamp(min=0)[:, None]
    in_top = (probs.topk(top_k, dim=-1).indices == ids).any(dim=-1)
    return real & in_top & (probs.gather(1, ids)[:, 0] > min_prob)


def promote(target_logits: torch.Tensor, draft_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Raise the draft token's logit to just above the row's maximum where `rows` is True, so
    that greedy verification (argmax == draft) accepts it. In place; returns the tensor."""
    if bool(rows.any()):
        idx = rows.nonzero()[:, 0]
        top = target_logits[idx].max(dim=-1).values
        target_logits[idx, draft_ids[idx].long()] = top + 1.0
    return target_logits


def _rejection_sampler_class():
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    class RelaxedRejectionSampler(RejectionSampler):
        """vLLM's rejection sampler with DARE's relaxed acceptance for greedy requests."""

        def __init__(self, sampler, spec_config=None, device=None, *, top_k: int = 2,
                     min_prob: float = 0.1):
            super().__init__(sampler, spec_config, device)
            if top_k < 1 or not 0 <= min_prob < 1:
                raise ValueError("need top_k >= 1 and 0 <= min_prob < 1")
            self.top_k, self.min_prob = top_k, min_prob
            self.promoted = 0      # draft tokens accepted by the rule but not the argmax

        def apply_logits_processors(self, logits, sampling_metadata, metadata):
            logits = super().apply_logits_processors(logits, sampling_metadata, metadata)
            draft = metadata.draft_token_ids
            if draft.numel() == 0:
                return logits
            ok = relaxed_accept(logits, draft, self.top_k, self.min_prob)
            if not sampling_metadata.all_greedy:    # only greedy requests are relaxed
                per_req = torch.as_tensor(metadata.num_draft_tokens, device="cpu")
                greedy = (sampling_metadata.temperature.cpu() == 0).repeat_interleave(per_req)
                ok &= greedy.to(ok.device)
            ok &= logits.argmax(dim=-1) != draft.long()   # the argmax passes already
            self.promoted += int(ok.sum())
            return promote(logits, draft, ok)

    return RelaxedRejectionSampler


def install(model_runner, vllm_config) -> None:
    """Replace the runner's rejection sampler by the relaxed one (settings: CONFIG_KEY)."""
    conf = (vllm_config.additional_config or {}).get(CONFIG_KEY) or {}
    old = getattr(model_runner, "rejection_sampler", None)
    if old is None:
        raise RuntimeError("relaxed verification needs speculative decoding: the model runner "
                           "has no rejection_sampler")
    cls = _rejection_sampler_class()
    model_runner.rejection_sampler = cls(
        old.sampler, vllm_config.speculative_config, getattr(model_runner, "device", None),
        top_k=int(conf.get("top_k", 2)), min_prob=float(conf.get("min_prob", 0.1)))


def worker_class_name() -> str:
    from vllm.platforms import current_platform
    suffix = "RelaxedCPUWorker" if current_platform.is_cpu() else "RelaxedGPUWorker"
    return f"{__name__}.{suffix}"


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    """The worker classes are built on first use: each imports its vLLM worker module."""
    if name not in ("RelaxedCPUWorker", "RelaxedGPUWorker", "RelaxedRejectionSampler"):
        raise AttributeError(name)
    if name not in _CLASSES:
        if name == "RelaxedRejectionSampler":
            _CLASSES[name] = _rejection_sampler_class()
        else:
            if name == "RelaxedCPUWorker":
                from vllm.v1.worker.cpu_worker import CPUWorker as base
            else:
                from vllm.v1.worker.gpu_worker import Worker as base

            def init_device(self):
                base.init_device(self)
                install(self.model_runner, self.vllm_config)

            _CLASSES[name] = type(name, (base,), {"init_device": init_device,
                                                  "__module__": __name__})
    return _CLASSES[name]
