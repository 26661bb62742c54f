#!/usr/bin/env bash
# DARE benchmark on a CUDA machine that has torch and transformers but none of our other
# dependencies and no network. Installs nothing: runs the repository from PYTHONPATH.
#
#   ops/gpu/bench_dare.sh --data-dir DIR --model-dir DIR [--out DIR] [--budget-s 450] [-- BENCH ARGS]
#   ops/gpu/bench_dare.sh --pack DIR        # on the CPU machine: gather model + data to ship
#
# --data-dir   directory with MovieLens-1M ratings.dat and movies.dat (or holding ml-1m/);
#              the licence forbids redistribution: ship it to your own machine, never commit it
# --model-dir  a transformers model directory (the float copy of SmolLM2-135M-Instruct that
#              `liber models fetch` writes to HOME/models/smollm2-135m-instruct)
# --out        where the JSON reports go (default: $OUT when set, else ./gpu-bench-out)
# --budget-s   wall-clock budget for everything (default 450 s: inside an 8-minute slot)
#
# Runs `python -m llm_workers.dare.bench` twice: float32 (strict must stay identical to greedy)
# and bfloat16, the second only when enough budget is left. Each run has its own timeout, so
# the script always ends inside the budget and reports what finished.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY=${PYTHON:-python3}
DEVICE=${DARE_BENCH_DEVICE:-cuda}    # cpu: a dry run of this script on a machine without GPU
DATA_DIR="" MODEL_DIR="" OUT_DIR="${OUT:-}" BUDGET=450 PACK="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --model-dir) MODEL_DIR="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --pack) PACK="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "bench_dare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { printf '[bench_dare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -n "$PACK" ]; then   # gather what the GPU machine needs (run where `liber` works)
  HOME_DIR=$(cd "$REPO" && "$PY" -c 'from liber.settings import Settings; print(Settings.load().home)') || exit 1
  mkdir -p "$PACK/data/ml-1m" "$PACK/model"
  cp "$HOME_DIR/data/ml-1m/ratings.dat" "$HOME_DIR/data/ml-1m/movies.dat" "$PACK/data/ml-1m/" || exit 1
  cp -r "$HOME_DIR/models/smollm2-135m-instruct/." "$PACK/model/" || exit 1
  say "packed into $PACK: --data-dir $PACK/data --model-dir $PACK/model ($(du -sh "$PACK" | cut -f1))"
  exit 0
fi

[ -n "$DATA_DIR" ] && [ -n "$MODEL_DIR" ] || { echo "need --data-dir and --model-dir (see --help)" >&2; exit 2; }
OUT_DIR=${OUT_DIR:-./gpu-bench-out}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LIBER_HOME="${LIBER_HOME:-$(mktemp -d)}"      # nothing is written to the user's cache

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
import llm_workers.dare.bench  # the import-light bench path
EOF

run() {  # run NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  say "run $name (timeout ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m llm_workers.dare.bench \
      --data-dir "$DATA_DIR" --model-dir "$MODEL_DIR" --device "$DEVICE" --verbose \
      --out "$OUT_DIR/dare-$name.json" "$@" "${EXTRA[@]}" > "$OUT_DIR/dare-$name.stdout" 2> "$OUT_DIR/dare-$name.log"
  local rc=$?
  if [ $rc -ne 0 ]; then say "run $name failed (exit $rc); last lines:"; tail -n 15 "$OUT_DIR/dare-$name.log" >&2; fi
  return $rc
}

# Sized so that the float32 run (with transformers' generate() as a second baseline) ends in
# about 3.5 minutes even at 25 tok/s of plain decoding; a fast GPU finishes far sooner.
COMMON=(--prompts 12 --warm 24 --max-new-tokens 128)
left() { echo $(( BUDGET - SECONDS )); }
status=0
run float32 $(( $(left) - 30 < 270 ? $(left) - 30 : 270 )) --dtype float32 --hf-baseline "${COMMON[@]}" || status=1
if [ "$(left)" -gt 120 ]; then
  run bfloat16 $(( $(left) - 15 )) --dtype bfloat16 "${COMMON[@]}" || status=1
else
  say "skipping the bfloat16 run: $(left) s of budget left"
fi

"$PY" - "$OUT_DIR" <<'EOF'
import glob, json, os, sys
keys = ("plain_tok_s", "strict_tok_s", "relaxed_tok_s", "strict_speedup", "relaxed_speedup",
        "global_relaxed_speedup", "strict_identical", "mean_accepted_len")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "dare-*.json"))):
    r = json.load(open(path))
    print(os.path.basename(path), json.dumps({k: r.get(k) for k in keys}))
    extra = r.get("hf_generate")
    if extra:
        print("  hf generate:", json.dumps(extra))
EOF
say "done in ${SECONDS}s; reports in $OUT_DIR"
exit $status
