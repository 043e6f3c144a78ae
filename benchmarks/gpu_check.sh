#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run (several minutes, most of it building the
# CUDA kernels once; not yet timed on a GPU):
#   1. build the native library with its CUDA kernels, report the device, and check that the
#      library's fused CUDA step takes a training call;
#   2. tests/test_cuda.py (it reruns its native tests with POWERNORM_CUDA_MERGED_FINISH=1);
#   3. norm_speed.py on the GPU, fp32 and bf16, with the separate finish kernels and then with
#      the merged finish (benchmarks/README.md, section "GPU"), then fp32 at two shapes with
#      16 and 64 thousand rows; skipped where step 1 failed.
# Each step's full output goes to OUTDIR/<step>.log; the end of each is printed. Exit status:
# 0 where every step passed.
#
# usage: benchmarks/gpu_check.sh [OUTDIR]      (default: gpu_check; PYTHON= picks python)
set -uo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -uo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME TAIL_LINES COMMAND...
  local name=$1 lines=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n "$lines" "$out/$name.log" | grep -v -e '^USDT:' -e '^INFO:'
  echo "== $name: exit status $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || failed+=("$name")
}

if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: $py's torch sees no CUDA device" >&2
  exit 2
fi
mkdir -p "$out"

step build 20 "$py" - <<'EOF'
import logging, time, torch
from powernorm_plugin.modules import PowerNorm, native_kernels
logging.basicConfig(level=logging.INFO)
warned = []
logging.getLogger(native_kernels.__name__).addFilter(lambda r: warned.append(r) or True)
start = time.time()
native_kernels.load_library()
target = native_kernels.cuda_target()
print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(),
      "target", target, f"loaded in {time.time() - start:.0f} s")
if target is None:
    raise SystemExit("no CUDA target: CUDA's compiler was not found (CUDA_HOME), so the library "
                     "was built for the CPU only")
if any(r.levelno >= logging.WARNING for r in warned):
    raise SystemExit("the CUDA kernels did not build")
# one training call straight into the C++ step, which returns (None, None) where no fused
# step takes the call
pn = PowerNorm(256, backend="native").cuda()
cfg = pn._configure()
x = torch.randn(6, 4, 256, device="cuda")
y, _ = cfg.train_step(x, *pn._tensors(), None, 24, 0, False, False, cfg.settings)
torch.cuda.synchronize()
if y is None:
    raise SystemExit("the library's fused CUDA step did not take a CUDA training call")
print("the fused CUDA step took a training call")
EOF
built=$([ ${#failed[@]} = 0 ] && echo yes)
step test_cuda 15 "$py" -m pytest -q -rs tests/test_cuda.py
if [ -n "$built" ]; then  # (without the CUDA step, "native" would time the Python step)
  speed=("$py" benchmarks/norm_speed.py --device cuda --backends native --rounds 10 --launches)
  step speed_fp32 60 "${speed[@]}"
  step speed_bf16 30 "${speed[@]}" --dtype bfloat16
  step speed_fp32_merged 60 env POWERNORM_CUDA_MERGED_FINISH=1 "${speed[@]}"
  step speed_bf16_merged 30 env POWERNORM_CUDA_MERGED_FINISH=1 "${speed[@]}" --dtype bfloat16
  # rows enough for the GPU's own time to count: how near the rows kernels (at most 128
  # blocks) come to the memory bandwidth
  step speed_fp32_large 30 "${speed[@]}" --shapes 256x64x1024 512x128x1024
else
  echo "== speed: skipped, the CUDA kernels were not built"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "gpu_check: every step passed (logs in $out)"
