#!/usr/bin/env bash
# The frontier of the round shape at the CPU budget (630 local steps of 16 images per site, as the centralized rows'
# epochs=6): fedbn-proto, fedbn and fedbn-proto with SCAFFOLD's drift correction (fedbn-proto-scaffold, local SGD
# at sgd-lr) with 5, 10, 21, 45 and 105 local steps per round (126, 63, 30, 14, 6 rounds),
# equal site weights (the default), 4 folds, accumulating in docs/results/frontier/<method>-ls<steps>/: a fold-run
# already there is skipped, so a later start continues. Seed 0 of every variant first, then seeds 1 and 2.
# Then: fl-covid-decide docs/results/frontier/* docs/results/cpu-grouped/runs/{contrastive,sepnorm} \
#         --out docs/results/frontier
# Usage: docs/results/frontier/run.sh [MINUTES]   (no fold-run starts after MINUTES)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
end=$(( $(date +%s) + ${1:-100000} * 60 ))
for seeds in 1 2 3; do
  for steps in 10 105 5 21 45; do
    for method in fedbn-proto fedbn fedbn-proto-scaffold; do
      left=$(( (end - $(date +%s)) / 60 ))
      [ "$left" -gt 0 ] || exit 0
      fl-covid-protocol --method "$method" --config configs/default.yaml --folds 4 --seeds "$seeds" --jobs 2 \
        --set local-steps="$steps" --set num-server-rounds=$(( 630 / steps )) \
        --out "$here/$method-ls$steps" --stop-after "$left" --quiet
    done
  done
done
