#!/usr/bin/env bash
# The paper's Fashion-MNIST setting at full length (10 clients, beta 0.5, 30% attackers, 50 rounds
# of 10 local epochs, all 60,000 training images), seed 0, one run after another with the fastest
# launch of a 2-core box: mpiexec -n 3 (two client ranks), clients trained in batched groups of 5.
#   bash jobs/reproduce-fmnist.sh [DATA_ROOT] [OUT_ROOT] [RUN ...]
# RUN names: vanilla fdcr fdcr_noise (default: all three), or marsfl baselines (see below).
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}; root=${2:-runs/reproduction}; shift $(( $# > 2 ? 2 : $# ))
runs=("$@"); [ ${#runs[@]} -gt 0 ] || runs=(fdcr vanilla fdcr_noise)
launch=(.venv/bin/mpiexec -n 3 .venv/bin/fdcr-mpi run configs/paper/fmnist.yaml --data-root "$data"
        train.batch_clients=5 seed=0)
for name in "${runs[@]}"; do
  case $name in
    vanilla) extra=(defense.name=fedavg) ;;
    fdcr) extra=(defense.name=fdcr) ;;
    fdcr_noise) extra=(defense.name=fdcr attack.fisher=noise) ;;
    *) extra=(defense.name="${name%_marsfl}" "${name%_marsfl}.variant=marsfl") ;;
  esac
  mkdir -p "$root/$name"
  echo "== $name: ${extra[*]} ($(date -u +%FT%TZ))"
  "${launch[@]}" "${extra[@]}" --out "$root/$name" 2>&1 | tee -a "$root/$name/console.log"
done
