#!/bin/bash
# The first GPU job (issue #20): one script that answers the open GPU questions on one H100/H200 in under 10 minutes
# and writes everything into one folder OUT: summary.json + summary.md (every step ok / failed with its log's last
# lines / skipped with why, and each step's numbers), steps.log (every step's whole output), kernels_qps.png.
#
#   make gpu-wheels                                   # beforehand, where PyPI answers: .gpu-wheels/ (what images lack)
#   bash bench/gpu_check.sh runs/gpu_check            # on the GPU machine, in the checkout's root, offline
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh /tmp/gc   # the same steps on the CPU at toy sizes (tests/test_gpu_check.py)
#
# Steps, in order (a step starts only while the budget lasts; each has its own time limit):
#   wheels        install the bundle's wheels whose distribution the image lacks; make `mpiexec -n 2` run mpi4py
#   env           versions, CUDA device, Triton target, nvidia-smi
#   pytest_gpu    pytest -m gpu over the files that mark GPU tests (but test_cuda_e2e.py), compiled Triton
#   ip_topk       bench/bench_kernels.py: 13.35M x 128 bf16, B 1 64 512 4096, k 8 64, vs torch matmul + topk,
#                 the copy bandwidth measured in the same run (and faiss-gpu where it imports)
#   marginal_lse  bench/bench_kernels.py: marginal log-sum-exp fwd + bwd vs the naive formula, fp32 and bf16
#   head          bench/bench_head.py: the chunked MLM head's peak memory and time vs full logits, fp32 and bf16
#   train_step    realm-hpc bench train-step on the demo recipe, the trainer on the GPU
#   cuda_e2e      pytest tests/test_cuda_e2e.py (GPU pretrain, resume on CPU, DeepSpeed, MPI refresher, finetune)
#   demo_mpi      the demo pretraining, trainer + MPI refresher on the GPU, cut at its time limit (SIGTERM:
#                 checkpoint and exit 75; the summary then says how far it got)
# Knobs: PYTHON (default .venv/bin/python where it runs, else python3), GPU_CHECK_WHEELS (default .gpu-wheels),
# GPU_CHECK_BUDGET_S (default 540), GPU_CHECK_DEMO_S (the demo's limit, default 150), GPU_CHECK_DRY=1,
# GPU_CHECK_STEPS (run only these steps, e.g. "ip_topk demo_mpi" to redo two; wheels and env always run).
set -uo pipefail  # no -e: a failing step is recorded and the next one runs

record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"; }
skip() { echo "-- $1: skipped ($2)"; record "$1" skipped 0 - - "$2"; }

# step NAME LIMIT_S CMD...: CMD under `timeout` (SIGTERM to its whole process group, SIGKILL 20 s later), its
# output in WORK/NAME.log. It gets LIMIT_S or what is left of the budget (DEADLINE less RESERVE_S), and does not
# start with under MIN_S (default 30) left. A command that writes WORK/NAME.skip is recorded as skipped for the
# reason in it; so is exit status SKIP_RC (if set), for the reason SKIP_WHY.
step() {
  local name=$1 limit=$2 left rc status why t0 t1
  shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " wheels env $GPU_CHECK_STEPS " != *" $name "* ]]; then
    skip "$name" "not in GPU_CHECK_STEPS"; return
  fi
  left=$((DEADLINE - $(date +%s) - RESERVE_S))
  if ((left < ${MIN_S:-30})); then skip "$name" "no time left: ${left} s of the ${BUDGET_S} s budget"; return; fi
  ((limit > left)) && limit=$left
  echo "-- $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  timeout -k 20 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  status=ok why=-
  if [ -f "$WORK/$name.skip" ]; then
    status=skipped why=$(head -n1 "$WORK/$name.skip")
  elif [ -n "${SKIP_RC:-}" ] && [ "$rc" = "$SKIP_RC" ]; then
    status=skipped why=$SKIP_WHY
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=failed why="timed out after ${limit} s (exit $rc)"
  elif [ "$rc" != 0 ]; then
    status=failed why="exit $rc"
  fi
  record "$name" "$status" "$(awk "BEGIN {printf \"%.1f\", $t1 - $t0}")" "$limit" "$rc" "$why"
  echo "   $status ($why) in $(awk "BEGIN {printf \"%.0f\", $t1 - $t0}") s"
}

# A step that needs torch, and a CUDA device unless this is the dry run (HAVE_*: WORK/env.sh, written by env).
device_step() {
  if [ "${HAVE_TORCH:-0}" != 1 ]; then skip "$1" "torch does not import (see env)"; return; fi
  if [ -z "$DRY" ] && [ "${HAVE_CUDA:-0}" != 1 ]; then skip "$1" "torch sees no CUDA device (see env)"; return; fi
  step "$@"
}

pytest_step() {
  if [ "${HAVE_PYTEST:-0}" != 1 ]; then skip "$1" "pytest does not import (see env)"; return; fi
  local name=$1 limit=$2
  shift 2
  SKIP_RC=5 SKIP_WHY="pytest collected no test" device_step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$WORK/$name.xml" "$@"
}

# Sourced (tests/test_gpu_check.py tries the step runner on its own): the functions only.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY:-}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
RESERVE_S=15  # kept for the summary
export GPU_CHECK_STARTED=$(date +%s) GPU_CHECK_BUDGET_S=$BUDGET_S GPU_CHECK_DRY=$DRY
DEADLINE=$((GPU_CHECK_STARTED + BUDGET_S))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ -z "${PYTHON:-}" ]; then
  if .venv/bin/python -c "" 2>/dev/null; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
PY=$(command -v "$PYTHON") || { echo "error: python '$PYTHON' not found (set PYTHON)" >&2; exit 2; }

# What every step runs under: this checkout first on the path, its interpreter's bin/ (mpiexec of a venv) on PATH,
# compiled Triton, no hub, and Open MPI allowed to run as root (the GPU image runs commands as root).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PATH="$(dirname "$PY"):$PATH" TRITON_INTERPRET=0 \
  REALM_HPC_KERNELS=auto HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg OMPI_ALLOW_RUN_AS_ROOT=1 \
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "gpu_check: python $PY, work $WORK, out $OUT, budget ${BUDGET_S} s${DRY:+ (dry run: CPU, toy sizes)}"

# Toy sizes for the dry run; the sizes the issue asks for on the GPU.
SMALL=(--set data.world_people=60 --set data.world_orgs=12 --set data.world_cities=6 --set data.heldout_facts=10
       --set data.eval_examples=10 --set model.vocab_size=400)
if [ -n "$DRY" ]; then
  DEV=cpu
  TOPK=(--n 20011 --b 1 64 --k 8 64 --repeats 2)
  MLSE=(--mlse-b 64 1024 --mlse-k 9 65 --repeats 2)
  HEAD=(--rows 32 --tokens 4 --vocab 257 --hidden 16 --chunk-sizes 0 50 --repeats 1 --memory-repeats 1)
  TRAIN=(--quick --repeats 3 "${SMALL[@]}" --set train.batch_size=4 --set refresh.every=2)
  DEMO=(--recipe tiny --steps 6 --set ict.steps=4 --set ict.eval_every=2 --set train.reader_warmup_steps=2
        --set train.eval_every=1000 --set refresh.every=2 "${SMALL[@]}")
else
  DEV=cuda
  TOPK=(--n 13350000 --b 1 64 512 4096 --k 8 64)
  MLSE=()
  HEAD=(--chunk-sizes 0 4096)
  TRAIN=(--recipe demo --repeats 30)
  DEMO=(--recipe demo --set eval.closed_book_baseline=false)
fi

step wheels 150 "$PY" bench/gpu_check.py install "${GPU_CHECK_WHEELS:-$ROOT/.gpu-wheels}" "$WORK"
# shellcheck disable=SC1091
[ -f "$WORK/site.env" ] && . "$WORK/site.env"
step env 90 "$PY" bench/gpu_check.py env "$WORK"
# shellcheck disable=SC1091
[ -f "$WORK/env.sh" ] && . "$WORK/env.sh"

# The files that mark GPU tests, not the whole suite: collecting every test module takes ~40 s on 2 CPU cores, and on
# a bare image some modules import what it lacks (a collection error is a failure).
mapfile -t GPU_TESTS < <(grep -rlE --include='*.py' 'mark\.gpu\b' tests | grep -vx 'tests/test_cuda_e2e.py' | sort)
if [ ${#GPU_TESTS[@]} = 0 ]; then skip pytest_gpu "no test file marks a test gpu"; else
  pytest_step pytest_gpu 180 -m gpu "${GPU_TESTS[@]}"
fi
device_step ip_topk 150 "$PY" bench/bench_kernels.py --device $DEV --benches ip_topk --dtypes bf16 "${TOPK[@]}" \
  --out "$WORK/ip_topk"
[ -f "$WORK/ip_topk/bench_kernels_qps.png" ] && cp "$WORK/ip_topk/bench_kernels_qps.png" "$OUT/kernels_qps.png"
device_step marginal_lse 60 "$PY" bench/bench_kernels.py --device $DEV --benches marginal --dtypes fp32 bf16 \
  "${MLSE[@]}" --out "$WORK/marginal_lse"
device_step head 60 "$PY" bench/bench_head.py --device $DEV --dtypes fp32 bf16 "${HEAD[@]}" --out "$WORK/head"
device_step train_step 120 "$PY" -m realm_hpc bench train-step "${TRAIN[@]}" --set train.device=$DEV \
  --out "$WORK/train_step"
pytest_step cuda_e2e 210 tests/test_cuda_e2e.py

read -r MPI_STATE MPI_SAID <"$WORK/mpi.txt" 2>/dev/null || MPI_STATE=no MPI_SAID="the MPI probe did not run"
if [ "$MPI_STATE" != ok ]; then
  skip demo_mpi "MPI cannot run two ranks: $MPI_SAID"
else
  # Two ranks share the node's cores (torch's default would give each of them all of them).
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + 1) / 2 ))} MIN_S=60 device_step demo_mpi "${GPU_CHECK_DEMO_S:-150}" \
    mpiexec -n 2 "$PY" -m realm_hpc pretrain "${DEMO[@]}" \
    --set refresh.mode=mpi --set train.device=$DEV --set refresh.device=$DEV --out "$WORK/demo_mpi"
fi

"$PY" bench/gpu_check.py summary "$OUT" "$WORK" || { echo "error: the summary failed; raw steps:" >&2
  cat "$WORK/steps.tsv" >&2; cp "$WORK/steps.tsv" "$OUT/"; exit 1; }
cat "$OUT/summary.md"
echo
echo "gpu_check: $OUT/summary.md, summary.json, steps.log (scratch: $WORK)"
