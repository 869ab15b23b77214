#!/usr/bin/env bash
# Federated fold-runs at the CPU budget (630 local steps of 16 images per site, as the centralized rows' epochs=6),
# equal site weights (the default), 4 folds, accumulating in docs/results/frontier/<method>-ls<steps>/: a fold-run
# already there is skipped, so a later start continues. In order:
#   1. the parity rows at 63 rounds x 10 local steps, seeds 0-2: fedbn-proto, fedbn;
#   2. the other federated rows of Table I at 63 x 10, seed 0: fedavg, fedprox (the paper's claims need them), then
#      fedadam, fedyogi, fedavgm, scaffold, fedbn-series-adapter, fedbn-parallel-adapter, fedbn-ms-net;
#   3. seed 0 of the frontier of the round shape (fedbn-proto, fedbn, fedbn-proto-scaffold at 105, 45, 21, 5 local
#      steps per round: 6, 14, 30, 126 rounds);
#   4. seeds 1-2 of the frontier.
# SCAFFOLD's local SGD rate was chosen by the pooled-validation rule among 0.01, 0.03, 0.1 at 63 x 10
# (fedbn-proto-scaffold-ls10*): sgd-lr 0.01, the default.
# Then: fl-covid-decide docs/results/frontier/*-ls* docs/results/cpu-grouped/runs/{contrastive,sepnorm} \
#         --out docs/results/frontier
# Usage: docs/results/frontier/run.sh [MINUTES]   (no fold-run starts after MINUTES)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
end=$(( $(date +%s) + ${1:-100000} * 60 ))
run() {  # method, number of seeds, local steps
  local left=$(( (end - $(date +%s)) / 60 ))
  [ "$left" -gt 0 ] || exit 0
  fl-covid-protocol --method "$1" --config configs/default.yaml --folds 4 --seeds "$2" --jobs 2 \
    --set local-steps="$3" --set num-server-rounds=$(( 630 / $3 )) \
    --out "$here/$1-ls$3" --stop-after "$left" --quiet
}
for method in fedbn-proto fedbn; do run "$method" 3 10; done
for method in fedavg fedprox fedadam fedyogi fedavgm scaffold fedbn-series-adapter fedbn-parallel-adapter \
              fedbn-ms-net; do
  run "$method" 1 10
done
for steps in 105 45 21 5; do for method in fedbn-proto fedbn fedbn-proto-scaffold; do run "$method" 1 "$steps"; done; done
for steps in 105 45 21 5; do for method in fedbn-proto fedbn fedbn-proto-scaffold; do run "$method" 3 "$steps"; done; done
