#!/usr/bin/env bash
# Install SLURM (slurmctld, slurmd, sbatch, srun) and MUNGE when they are missing, for the
# real-SLURM end-to-end test (tests/test_slurm.py starts its own private cluster).
# Idempotent, quiet, and never fails its caller: where it cannot install (no root, no apt-get,
# no network), it says so on stderr and the test skips with that reason.
# Usage (from .ci/run): bash jobs/install-slurm.sh
set -u

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=""
for bin in slurmctld slurmd sbatch srun scontrol munged; do
    have "$bin" || missing="$missing $bin"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: missing$missing; installing needs root and apt-get (the SLURM test will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/dev/null 2>&1; then
    echo "install-slurm: apt-get update failed; trying the package lists already here" >&2
fi
if ! apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1; then
    echo "install-slurm: could not install slurm/munge with apt-get (the SLURM test will skip)" >&2
fi
exit 0
