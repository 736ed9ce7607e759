#!/usr/bin/env bash
# The GPU check: one call of a machine with one NVIDIA GPU, about 6 minutes, installing nothing but
# the wheels carried in .whl/ (optree: the GPU image lacks it). Everything it writes is under $OUT:
#
#   env.txt                  GPU, driver, torch / triton / transformers versions
#   cuda_tests.txt, .xml     `pytest -m cuda`: every check of a CUDA path (tests/test_cuda.py, the
#                            Triton kernels, flex attention), each test's result listed
#   gpu_step.md, .json       benchmarks/gpu_step.py --profile: the speed table against HF, the
#                            kernels' checks, the loss of evo vs HF, the top kernels of one evo step
#   profile_<shape>/         that step's Chrome trace and kernel table
#   summary.txt              the exit status of each part and the tables
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/gpu bash scripts/gpu_check.sh --smoke    # anywhere: the tests collected, tiny shapes
#
# Each part has its own time limit (GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S seconds), so a hang in
# one leaves the others their time; gpu_step.py writes its files after each shape.
# GPU_CHECK_BENCH_ARGS adds arguments to gpu_step.py (e.g. "--triton", "--shapes llama-1.1B").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/evo_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/evo_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv) 2>&1 || true
    "$PY" -c "import torch, triton, transformers, optree; print('torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers',
transformers.__version__, 'optree', optree.__version__, 'gpu', torch.cuda.is_available())" 2>&1
} > "$OUT/env.txt"

if [ $smoke = 1 ]; then
    tests=(--collect-only -q)
    bench=(--smoke --steps 2 --warmup 1)
else
    tests=(-q -rA -n 4 --junitxml "$OUT/cuda_tests.xml")
    bench=()
fi
timeout "${GPU_CHECK_TESTS_S:-110}" "$PY" -m pytest -m cuda -p no:cacheprovider "${tests[@]}" \
    > "$OUT/cuda_tests.txt" 2>&1
tests_rc=$?
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS: words on purpose
timeout "${GPU_CHECK_BENCH_S:-240}" "$PY" benchmarks/gpu_step.py --profile "${bench[@]}" \
    ${GPU_CHECK_BENCH_ARGS:-} --out "$OUT" > "$OUT/gpu_step.log" 2>&1
bench_rc=$?

{
    cat "$OUT/env.txt"
    echo "pytest -m cuda: exit $tests_rc"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|collected|tests? collected" \
        "$OUT/cuda_tests.txt" | tail -60
    echo "benchmarks/gpu_step.py: exit $bench_rc"
    cat "$OUT/gpu_step.md" 2>/dev/null || tail -30 "$OUT/gpu_step.log"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ $tests_rc = 0 ] && [ $bench_rc = 0 ]
