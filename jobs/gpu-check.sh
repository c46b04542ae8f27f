#!/usr/bin/env bash
# make gpu-check [GPU_OUT=DIR]: the prepared check for a machine with a CUDA GPU (at most ~8 minutes
# on one H200). Steps, each bounded by a timeout, each reported even when another fails:
#   1. the machine: GPU, driver, torch and CUDA versions;
#   2. the device tests (tests/test_devices.py, test_gpu_variants.py: training, Fisher, batched
#      groups, evaluation, pinned staging, the defenses and their variants on the GPU,
#      deterministic and close to the CPU);
#   3. the quick start on CUDA under mpiexec -n 3, twice, and once in one process: the three final
#      sha256 must be equal (deterministic kernels; one GPU shared by the two client ranks; the
#      default batched groups of 5 clients); and one client at a time (train.batch_clients=1),
#      under mpiexec -n 3 and in one process: equal again;
#   4. benchmarks/gpu.py: batched against one-by-one clients per GPU.
# Results: DIR/summary.json (pass/fail per step, the shas), DIR/gpu.json and gpu.md, DIR/check.log.
# PYTHON and MPIEXEC may name the interpreter (with fdcr_mpi importable) and the MPI launcher.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
[ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || echo mpiexec)
mkdir -p "$out"
log=$out/check.log
work=$(mktemp -d)
: > "$log"
declare -A status
step() { echo "== $1 ($(date -u +%T))" | tee -a "$log"; }
record() { status[$1]=$2; echo "-- $1: $2" | tee -a "$log"; }

step "machine"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  "$MPIEXEC" --version 2>&1 | head -2; } >> "$log" 2>&1
"$PY" -c "import torch; assert torch.cuda.is_available()" >> "$log" 2>&1 && record machine pass || record machine fail

step "device tests on the GPU"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py tests/test_gpu_variants.py >> "$log" 2>&1 \
  && record device_tests pass || record device_tests fail

step "quick start on CUDA: mpiexec -n 3 twice, one process once"
quick=(-m fdcr_mpi run configs/quickstart.yaml runtime.device=cuda --quiet)
sha() { grep -o 'final model sha256: [0-9a-f]*' "$1" | tail -1 | cut -d' ' -f4; }
for name in mpi_a mpi_b; do
  timeout 150 "$MPIEXEC" -n 3 "$PY" "${quick[@]}" --out "$work/$name" > "$work/$name.txt" 2>&1
  echo "$name rc=$? sha=$(sha "$work/$name.txt")" | tee -a "$log"; tail -3 "$work/$name.txt" >> "$log"
done
timeout 150 "$PY" "${quick[@]}" --out "$work/one" > "$work/one.txt" 2>&1
echo "one rc=$? sha=$(sha "$work/one.txt")" | tee -a "$log"; tail -3 "$work/one.txt" >> "$log"
a=$(sha "$work/mpi_a.txt"); b=$(sha "$work/mpi_b.txt"); c=$(sha "$work/one.txt")
[ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" = "$c" ] && record quickstart_same_sha pass || record quickstart_same_sha fail
for name in serial_mpi serial_one; do
  launcher=(); [ $name = serial_mpi ] && launcher=("$MPIEXEC" -n 3)
  timeout 150 "${launcher[@]}" "$PY" "${quick[@]}" train.batch_clients=1 --out "$work/$name" > "$work/$name.txt" 2>&1
  echo "$name rc=$? sha=$(sha "$work/$name.txt")" | tee -a "$log"; tail -3 "$work/$name.txt" >> "$log"
done
d=$(sha "$work/serial_mpi.txt"); e=$(sha "$work/serial_one.txt")
[ -n "$d" ] && [ "$d" = "$e" ] && record one_by_one_same_sha pass || record one_by_one_same_sha fail
"$PY" - "$work" >> "$log" 2>&1 <<'EOF'
import json, sys, h5py, numpy as np
for name in ("mpi_a", "one"):
    with h5py.File(f"{sys.argv[1]}/{name}/run.h5") as f:
        print(name, "numerics", json.loads(f.attrs["numerics"]))
        print(name, "A", np.round(f["rounds/A"][:], 2).tolist(), "R", np.round(f["rounds/R"][:], 2).tolist())
        print(name, "seconds per round", np.round(f["rounds/seconds_round"][:], 2).tolist())
EOF

step "benchmark: batched against one-by-one clients per GPU"
timeout 240 "$PY" -m benchmarks.gpu --out "$out" >> "$log" 2>&1 && record benchmark pass || record benchmark fail

"$PY" - "$out" "$a" "$b" "$c" "$d" "$e" <<EOF
import json, sys
steps = {$(for k in "${!status[@]}"; do printf '"%s": "%s", ' "$k" "${status[$k]}"; done)}
json.dump({"steps": steps, "quickstart_sha": {"mpiexec_n3_a": sys.argv[2], "mpiexec_n3_b": sys.argv[3],
           "one_process": sys.argv[4], "one_by_one_mpiexec_n3": sys.argv[5],
           "one_by_one_one_process": sys.argv[6]}}, open(sys.argv[1] + "/summary.json", "w"), indent=2)
print(json.dumps(steps))
EOF
rm -rf "$work"
for s in "${status[@]}"; do [ "$s" = pass ] || exit 1; done
