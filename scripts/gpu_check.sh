#!/usr/bin/env bash
# The GPU checks in one go, under 8 minutes on one NVIDIA GPU: the attention kernels (cuDNN against XLA) and the
# float16 VAE fallback, the SD 1.5 benchmark, a few parity tests against diffusers, and the benchmark beside
# diffusers on the GPU when PyTorch sees one. Every part runs under its own timeout, a failed part does not stop the
# next, and the end prints a summary. Runs in the repository root; writes seven files into OUT_DIR.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_check_out)
#
# Offline machines: wheels in $WHEELS (default ./.whl) are installed first, without dependencies (e.g. diffusers,
# importlib_metadata, PyWavelets, open-clip-torch, invisible-watermark). The machine's own torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-./gpu_check_out}}
mkdir -p "$out"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-460}))  # seconds from the start; no part runs past it
summary=$out/summary.txt
export PYTHONUNBUFFERED=1
export SD_JAX_TEST_PLATFORM=cuda  # tests/conftest.py forces CPU otherwise
results=()

# part NAME CAP LOG COMMAND...: COMMAND under `timeout` (at most CAP seconds, never past the deadline), its output
# into LOG; the outcome goes to the summary. Never fails itself.
part() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit=$((deadline - SECONDS))
  if [ "$cap" -lt "$limit" ]; then limit=$cap; fi
  if [ "$limit" -lt 20 ]; then
    results+=("$(printf '%-16s %s' "$name" "skipped: out of time")")
    return 0
  fi
  echo "== $name (at most ${limit}s) -> $log"
  local start=$SECONDS rc=0 status=ok
  { echo "\$ $*"; timeout -k 10 "$limit" "$@"; } >>"$log" 2>&1 || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMED OUT at ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  results+=("$(printf '%-16s %-20s %4ds  %s' "$name" "$status" $((SECONDS - start)) "$(basename "$log")")")
  echo "   $status"
}

skip() {
  results+=("$(printf '%-16s %s' "$1" "skipped: $2")")
  echo "== $1 skipped: $2"
}

install_deps() {
  set -x
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile "$WHEELS"/*.whl
  fi
  # The package with its dependencies (offline: only if they are all there), else the package alone. No build
  # isolation: that would fetch setuptools.
  "$PY" -m pip install --quiet --retries 0 --timeout 10 --no-build-isolation -e . ||
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
  # The test extra without torch (setup.py pins a CPU build; the machine's CUDA torch stays), and the two packages
  # whose metadata asks for torch.
  "$PY" -m pip install --quiet --retries 0 --timeout 10 "pytest>=8.0" "diffusers==0.42.1" "transformers>=5.0" || true
  "$PY" -m pip install --quiet --retries 0 --timeout 10 --no-deps open-clip-torch invisible-watermark || true
  "$PY" -c "import sd_jax.configs.sd15"  # the outcome: sd_jax and its presets import
}
export -f install_deps
export PY WHEELS

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" - <<'EOF'
import os, sys
import jax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| backend", jax.default_backend(), jax.devices())
try:
    from jax._src.lib import cuda_versions
    print("cudnn", cuda_versions.cudnn_get_version() if cuda_versions else None)
except Exception as e:  # a private module: report, never fail
    print("cudnn version unknown:", e)
for name in ("flax", "torch", "diffusers", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "missing:", type(e).__name__)
print("SD_JAX_ATTENTION", os.environ.get("SD_JAX_ATTENTION", "(unset: auto)"))
EOF
}
export -f environment

rm -f "$summary" "$out"/{install,attention_tests,benchmark,parity_tests}.log "$out"/benchmark{,_torch}.json
part install 60 "$out/install.log" bash -c install_deps
part environment 40 "$summary" bash -c environment

# What the optional parts need (one probe: importing torch takes seconds).
probe=$("$PY" -c "import diffusers, torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null |
  tail -n 1 || true)

part attention 150 "$out/attention_tests.log" \
  "$PY" -m pytest tests/test_attention_impl.py tests/test_vae_fallback.py -q -s -rs --durations=5 -p no:cacheprovider

bench=(--config=sd15 --resolution=512 --batch=1 --steps=50 --dtype=bfloat16 --sampler=euler)
part benchmark 200 "$out/benchmark.log" "$PY" scripts/benchmark.py "${bench[@]}" --json="$out/benchmark.json"

if [ -n "$probe" ]; then
  part parity 120 "$out/parity_tests.log" "$PY" -m pytest -q -rs --durations=5 -p no:cacheprovider \
    "tests/test_unet.py::test_parity_with_diffusers[sd1]" "tests/test_unet.py::test_parity_with_diffusers[sd2]" \
    tests/test_unet.py::test_bfloat16_runs_close_to_float32 "tests/test_vae.py::test_encode_decode_parity[sd]"
else
  skip parity "needs diffusers and torch"
fi

if [ "$probe" = cuda ]; then
  # The second run loads sd_jax's compiled programs from the persistent compilation cache the first one wrote.
  part benchmark_torch 200 "$out/benchmark.log" "$PY" scripts/benchmark.py "${bench[@]}" --compare=torch \
    --json="$out/benchmark_torch.json"
else
  skip benchmark_torch "needs diffusers and a CUDA build of torch that sees the GPU"
fi

{
  echo
  echo "== summary ($SECONDS s in all; logs and JSON in $out)"
  printf '%s\n' "${results[@]}"
} | tee -a "$summary"
