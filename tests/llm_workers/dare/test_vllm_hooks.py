"""The vLLM version and the internals DARE's hooks rely on: fails loudly when an upgrade moves them.

vLLM calls our proposer and our rejection sampler through interfaces it marks experimental
(`custom_class` proposers) or internal (the model runner's `rejection_sampler`, the CPU worker's
`init_device`). Each assertion below names what changed; read llm_workers/dare/vllm_proposer.py
and vllm_relaxed.py before raising the pin.
"""
from __future__ import annotations

import inspect
import os
import re

import pytest

if os.environ.get("LIBER_SETUP_VLLM") == "0":
    pytest.skip("vLLM left out by LIBER_SETUP_VLLM=0", allow_module_level=True)

from llm_workers.dare import vllm_proposer, vllm_relaxed  # noqa: E402


def _source(obj) -> str:
    return re.sub(r"\s+", " ", inspect.getsource(obj))


def test_vllm_is_the_pinned_version():
    import vllm   # CI installs it (ops/setup.sh); a missing vLLM is a failure, not a skip
    assert vllm.__version__ == vllm_proposer.PINNED_VLLM, (
        f"vLLM {vllm.__version__} installed, hooks tested on {vllm_proposer.PINNED_VLLM}")


def test_the_custom_proposer_hook_calls_propose_as_we_expect():
    from vllm.v1.spec_decode import custom_class_proposer
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    create = _source(custom_class_proposer.create_custom_proposer)
    assert "user_class(vllm_config)" in create, "custom proposers are no longer built as Class(vllm_config)"
    call = _source(GPUModelRunner.propose_draft_token_ids)
    assert ('elif spec_config.method == "custom_class": assert isinstance(sampled_token_ids, list) '
            'draft_token_ids = cast(Any, self.drafter).propose( sampled_token_ids, '
            'self.input_batch.num_tokens_no_spec, self.input_batch.token_ids_cpu, '
            'slot_mappings=slot_mappings, )') in call, "the custom_class propose() call changed"
    assert "self.drafter.load_model(self.model)" in _source(CPUModelRunner.load_model)
    params = list(inspect.signature(vllm_proposer.DareProposer.propose).parameters)
    assert params[:5] == ["self", "sampled_token_ids", "num_tokens_no_spec", "token_ids_cpu",
                          "slot_mappings"]


def test_the_rejection_sampler_hook_is_where_relaxed_verification_sits():
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    assert list(inspect.signature(RejectionSampler.__init__).parameters) == [
        "self", "sampler", "spec_config", "device"]
    assert list(inspect.signature(RejectionSampler.apply_logits_processors).parameters) == [
        "self", "logits", "sampling_metadata", "metadata"]
    forward = _source(RejectionSampler.forward)
    # our rule runs inside apply_logits_processors, before greedy verification reads the argmax
    assert forward.index("self.apply_logits_processors(") < forward.index("rejection_sample(")
    assert "self.rejection_sampler = RejectionSampler(" in _source(GPUModelRunner.__init__)
    assert "self.rejection_sampler(" in _source(GPUModelRunner._sample)
    assert "self.model_runner = CPUModelRunner(" in _source(CPUWorker.init_device)
    worker = vllm_relaxed.RelaxedCPUWorker
    assert issubclass(worker, CPUWorker) and vllm_relaxed.worker_class_name().endswith("RelaxedCPUWorker")
    assert issubclass(vllm_relaxed.RelaxedRejectionSampler, RejectionSampler)
