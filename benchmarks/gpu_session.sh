#!/usr/bin/env bash
# Everything that needs a GPU, in one run (a lent GPU machine gives 15 minutes in all): build the
# extension against the machine's own torch, run the CUDA tests, time every benchmark on the GPU,
# and copy the logs and benchmarks/results/*.jsonl to $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#
# Each step logs to $OUT/<step>.log; a failing step is reported and the next one still runs.
#
# The CIFAR-10 quality protocol (issue 4) needs the data and a call of its own (10 minutes a call;
# the epochs below are a guess, as no GPU epoch has been timed: the run prints seconds per phase):
#   here:  mkdir -p gpu-data && cp ../shared/data/cifar10-jpeg.tar.gz \
#              ../shared/data/pretrained/cifar10-resnet20-*.th gpu-data/      (git-ignored; carry it)
#   there: python benchmarks/quality_tas.py --device cuda --model resnet20 --arch-control \
#              --data gpu-data/cifar10-jpeg.tar.gz --pretrained gpu-data/cifar10-resnet20-12fca82f.th \
#              --baseline-epochs 2 --search-epochs 15 --finetune-epochs 15 && cp benchmarks/results/quality_tas.jsonl $OUT/
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0"}
status=0

step() {  # step NAME COMMAND...: run, log, time, remember failures
  local name=$1; shift
  local t0=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "ok    $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL  $name ($((SECONDS - t0)) s): tail of $OUT/$name.log"; tail -20 "$OUT/$name.log"; status=1
  fi
}

step build   $PY -m pip install -q --no-build-isolation --no-deps -e .
step env     $PY -m nasprune.env
step tests   $PY -m pytest -q -x tests/ops tests/nn tests/test_scores.py -k "cuda or triton" -p no:cacheprovider
step bench_gate_epilogue   $PY benchmarks/bench_gate_epilogue.py --device cuda
step bench_width_aggregate $PY benchmarks/bench_width_aggregate.py --device cuda
step bench_scores          $PY benchmarks/bench_scores.py --device cuda --dtype bfloat16
step bench_tas             $PY benchmarks/bench_tas.py --device cuda
step bench_slim            $PY benchmarks/bench_slim.py --skip-pipeline
cp benchmarks/results/*.jsonl "$OUT"/ 2>/dev/null
exit $status
