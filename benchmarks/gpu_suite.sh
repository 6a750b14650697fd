#!/usr/bin/env bash
# The GPU suite: every device measurement of the package in one run, as plain text.
#
#     bash benchmarks/gpu_wheels.sh                   # here, once: wheels the GPU machine lacks -> .whl/
#     bash benchmarks/gpu_suite.sh --out "$OUT"       # on the GPU machine (carry .whl/): < 6 min on one H100
#     bash benchmarks/gpu_suite.sh --device cpu --quick --out /tmp/suite   # the same steps, CI-sized, on a CPU
#     bash benchmarks/gpu_suite.sh --dry-run          # print each step's command; run and write nothing
#
# Everything it writes goes under --out (default results/benchmarks/gpu/), so a machine that only
# hands back one folder ($OUT on the device tool's machines) hands back all of it. Steps, in this
# order (a run cut short keeps the steps it finished), each writing <out>/<step>.txt:
#   tests     the model, AR, sampler and exact-guidance tests (their CUDA tests run on a GPU)
#   parity    CPU-vs-device token parity of the samplers; CUDA-graph vs eager AR decoding
#   loss_head the MDLM loss head at the training micro-batch: through the SUBS log-prob tensor vs
#             fused, time and peak memory (benchmarks/bench_loss_head.py)
#   decode    the decoding-speed study (benchmarks/bench_decode.py), with a profile of where one
#             cached AR token's time goes: <out>/decode_speed.csv starts as a copy of
#             results/decode_speed.csv, gets this device's rows merged in, and is drawn to
#             <out>/decode_speed.png (both go back to results/ once the run is reviewed)
#   train     training throughput and MFU: plain PyTorch vs the package's DeepSpeed loop, eager
#             and compiled, with a profile of the plain loop's step (benchmarks/bench_train.py)
#   planner   the GTL planner sampler at paper size, n_ratio 64 and 512 (-> <out>/planner_cost.csv)
# summary.txt lists each step's exit status and seconds. DeepSpeed, submitit and webdataset
# come from .whl/ when they are not installed; without them the suite stops (it never skips the
# DeepSpeed rows). The exit status is 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
DRY_RUN=0
OUT=results/benchmarks/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {print} /^set /{exit}' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
FAILED=0

if [ "$DRY_RUN" = 1 ]; then
  step() { shift; printf '%q ' "$@"; echo; }  # print the step's command, shell-quoted
else
  step() {  # step NAME COMMAND...: run, keep its output, record status and time
    local name=$1 start rc
    shift
    start=$(date +%s)
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    echo "   rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    [ $rc = 0 ] || FAILED=1
  }
  mkdir -p "$OUT"
  if ! "$PY" -c "import deepspeed, submitit, webdataset" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "gpu_suite.sh: deepspeed/submitit/webdataset are missing and there is no .whl/;" \
           "run 'bash benchmarks/gpu_wheels.sh' where pip works and carry .whl/ here" >&2
      exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gtl_site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gtl_site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "$QUICK" = 1 ]; then
  TESTS=(tests/test_ar.py::test_input_checks)  # the step works; test_ar.py runs in the test suite
  PARITY=(--sequences 2)
  TRAIN=(--profile --steps 6 --log-every 2 --hidden 32 --seq-len 32 --batch 8 --worlds 1 --zero 0 --rounds 1)
  LOSS_HEAD=(--batch 2 --seq-len 16 --vocab 50 --hidden 32 --repeats 1)
  DECODE=(--size tiny --lengths 16 32 --batches 1 --repeats 1 --profile --out "$OUT/decode_speed.csv")
  PLANNER=(--size tiny --lengths 16 --batches 2 --n-ratio 8 --repeats 1)
else
  TESTS=(tests/test_models.py tests/test_ar.py tests/test_samplers.py tests/test_guidance_exact.py)
  PARITY=()
  TRAIN=(--profile --paper-size --steps 40 --worlds 1 --zero 2 --rounds 1)
  LOSS_HEAD=(--batch 64 --repeats 5)
  DECODE=(--budget-s 20 --total-budget-s 120 --repeats 1 --profile
          --out "$OUT/decode_speed.csv" --plot "$OUT/decode_speed.png")
  PLANNER=(--lengths 128 --batches 16 --n-ratio 64 512 --repeats 1 --budget-s 60)
fi

if [ "$DRY_RUN" = 0 ]; then
  [ "$QUICK" = 1 ] || [ -e "$OUT/decode_speed.csv" ] || cp results/decode_speed.csv "$OUT/decode_speed.csv"
  { date -u; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
    command -v nvidia-smi >/dev/null && nvidia-smi -L; } > "$OUT/summary.txt" 2>&1
fi
step tests "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step parity "$PY" benchmarks/bench_parity.py --device "$DEVICE" --min-parity 0.95 "${PARITY[@]}"
step loss_head "$PY" benchmarks/bench_loss_head.py --device "$DEVICE" "${LOSS_HEAD[@]}"
step decode "$PY" benchmarks/bench_decode.py --device "$DEVICE" "${DECODE[@]}"
step train "$PY" benchmarks/bench_train.py --device "$DEVICE" --compile "${TRAIN[@]}"
step planner "$PY" benchmarks/bench_decode.py --device "$DEVICE" --methods gtl_planner \
  --out "$OUT/planner_cost.csv" "${PLANNER[@]}"
[ "$DRY_RUN" = 1 ] && exit 0
echo "suite $([ $FAILED = 0 ] && echo passed || echo FAILED): $OUT/summary.txt" | tee -a "$OUT/summary.txt"
exit $FAILED
