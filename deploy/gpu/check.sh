#!/usr/bin/env bash
# The GPU device check, run on a lent GPU machine from the repository root, after deploy/gpu/build.sh
# here. With the `device` tool:   run(command="deploy/gpu/check.sh", carry=["target/gpu"], timeout_s=480)
#  1. finds the CUDA 13 libraries the binary links (the machine's PyTorch wheels carry them),
#  2. compares the GPU's denoiser outputs and samples with the CPU reference made here,
#  3. prints sampling-step latency and sentences/s at B = 1, 16, 64, 256 and train steps at each B.
# Everything printed also lands in $OUT/gpu.md. Steps run on even if one fails; the exit code says.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/dlm-gpu-check}
mkdir -p "$OUT"
BIN=$(mktemp -d)/dlm-generator
REPORT=$OUT/gpu.md
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }
status=0

gunzip -c target/gpu/dlm-generator.gz > "$BIN" && chmod +x "$BIN" ||
    { say "missing target/gpu/dlm-generator.gz: run deploy/gpu/build.sh first and carry target/gpu"; exit 2; }
say "## GPU check — $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say ""
say '```'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$REPORT"
say '```'

# Directories holding each library the binary needs; the driver's libcuda.so.1 is already known to ld.so.
lib_dirs=()
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
    path=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l { print $NF; exit }')
    if [ -z "$path" ]; then
        roots=(/usr/local/cuda /usr/lib /usr/local/lib /opt /root /home)
        roots+=($(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null))
        path=$(timeout 60 find "${roots[@]}" -name "$lib" 2>/dev/null | head -1)
    fi
    if [ -n "$path" ]; then
        lib_dirs+=("$(dirname "$path")")
    else
        say "not found: $lib"
    fi
done
LD_LIBRARY_PATH=$(printf '%s\n' "${lib_dirs[@]}" | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
if ldd "$BIN" | grep -q "not found"; then
    say "unresolved libraries:"; ldd "$BIN" | grep "not found" | tee -a "$REPORT"
    exit 3
fi

say ""
say "### Same results as the CPU (models/e2e-small, reference made with the CPU build)"
say ""
timeout 120 "$BIN" --device cuda:0 device-parity --model models/e2e-small \
    --reference target/gpu/reference.json 2>"$OUT/parity.log" | tee -a "$REPORT"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; say "parity FAILED:"; tail -5 "$OUT/parity.log" | tee -a "$REPORT"; }

say ""
say "### Speed (median of 10; train step = forward + backward + AdamW)"
say ""
timeout 300 "$BIN" --device cuda:0 bench --model models/e2e-small --batches 1,16,64,256 \
    --thread-counts 1 --reps 10 2>"$OUT/bench.log" | tee -a "$REPORT"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; say "bench FAILED:"; tail -5 "$OUT/bench.log" | tee -a "$REPORT"; }
exit $status
