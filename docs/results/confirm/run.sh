#!/usr/bin/env bash
# Decision 7's confirmation on folds nobody had seen: seeds 3 and 4 (new fold assignments), 4 folds each, for the
# default fedbn-proto at 63 rounds x 10 local steps, the variant with both Site A levers (Site A's BN statistics
# through the training transform, server step 2), and centralized contrastive learning at the same budget
# (epochs 6). Accumulating: a fold-run already here is skipped. Then:
#   fl-covid-report docs/results/confirm/{contrastive,fedbn-proto-ls10,fedbn-proto-ls10-bntrainA-serverlr2} \
#     --out docs/results/confirm --planned 8
# Usage: docs/results/confirm/run.sh [MINUTES]   (no fold-run starts after MINUTES)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
end=$(( $(date +%s) + ${1:-100000} * 60 ))
run() {  # out folder, method, overrides...
  local out=$1 method=$2; shift 2
  local left=$(( (end - $(date +%s)) / 60 ))
  [ "$left" -gt 0 ] || exit 0
  fl-covid-protocol --method "$method" --config configs/default.yaml --folds 4 --seeds 5 --from-seed 3 --jobs 2 \
    "$@" --out "$here/$out" --stop-after "$left" --quiet
}
fed=(--set local-steps=10 --set num-server-rounds=63)
run fedbn-proto-ls10 fedbn-proto "${fed[@]}"
run fedbn-proto-ls10-bntrainA-serverlr2 fedbn-proto "${fed[@]}" --set bn-transform=site_a_sarscov2=train --set server-lr=2
run contrastive contrastive --set epochs=6
