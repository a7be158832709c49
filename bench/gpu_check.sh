#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H200: torch + CUDA + nvcc, no vLLM, no network),
# run from the repository root: `bash bench/gpu_check.sh`. About 5 minutes:
#   1. build strategies._C with the CUDA kernels against the machine's torch,
#   2. pytest tests/ops (CUDA kernels vs strategies/reference.py, the CPU kernels, nvcc builds),
#   3. the GPU kernel benchmark (bench/kernels_gpu.py).
# Everything is tee'd to $OUT/gpu_check.txt (default ./out). Steps continue after a failure;
# the exit status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.txt") 2>&1
tee_pid=$!
export MAX_JOBS=16

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
status=0
step() {
  local name="$1" limit="$2"
  shift 2
  echo
  echo "=== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - started))s"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -n 2 || true
"$PYTHON" - <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
for name in ("pytest", "ninja", "vllm"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
EOF

if step build 180 env TORCH_CUDA_ARCH_LIST=9.0 "$PYTHON" setup.py -q build_ext --inplace; then
  "$PYTHON" -c "from strategies import ops; print('CUDA kernels:', {n: ops.has_compiled(n, 'cuda') for n in ops.OP_NAMES})"
  # The emulated-kernel cases are deselected: the GPU runs the same checks on the real kernels.
  step tests 180 "$PYTHON" -m pytest tests/ops -q -p no:cacheprovider -o addopts="" -rs \
    -k "not emulated"
  step benchmark 60 "$PYTHON" -m bench.kernels_gpu --quick
fi
echo
echo "=== gpu_check: exit $status"
exec >&- 2>&-
wait "$tee_pid"
exit "$status"
