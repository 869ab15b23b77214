#!/usr/bin/env bash
# The centralized rows of Table I at the CPU budget (630 steps of 16 images per site: epochs=6), 4 folds x 3 seeds,
# accumulating in docs/results/cpu-grouped/runs/<method>/: a fold-run already there is skipped, so a later start
# continues where the last one stopped. Seed 0 of every row first, then seeds 1 and 2.
# Usage: docs/results/cpu-grouped/run-central.sh [MINUTES]   (no fold-run starts after MINUTES)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
end=$(( $(date +%s) + ${1:-100000} * 60 ))
for seeds in 1 3; do
  for method in single joint sepnorm contrastive series-adapter parallel-adapter ms-net; do
    left=$(( (end - $(date +%s)) / 60 ))
    [ "$left" -gt 0 ] || exit 0
    fl-covid-protocol --method "$method" --config configs/default.yaml --folds 4 --seeds "$seeds" --jobs 2 \
      --set epochs=6 --out "$here/runs/$method" --stop-after "$left" --quiet
  done
done
