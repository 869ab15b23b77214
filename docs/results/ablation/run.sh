#!/usr/bin/env bash
# The ablation of the federated levers on the validation splits (4 folds x seed 0, grouped protocol, the CPU
# setting of configs/default.yaml at a budget of 630 local steps of 16 images per site, evaluation every 5 rounds).
# Each variant adds one lever to the one before (A -> F), G..J vary E or D. Results: runs/ablation/<variant>/;
# table: python docs/results/ablation/table.py runs/ablation > docs/results/ablation/table.md
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=${1:-runs/ablation}
common=(--config configs/default.yaml --folds 4 --seeds 1 --jobs 2 --quiet --set eval-every=5)
old=(--set bn-recalibration=false --set fedavg-weights=dataset --set summary-images=0)
short=(--set num-server-rounds=6 --set local-steps=105)
long=(--set num-server-rounds=30 --set local-steps=21)
run() { local name=$1; shift; fl-covid-protocol "${common[@]}" --out "$out/$name" "$@" >"$out/$name.log" 2>&1 || true; }
mkdir -p "$out"
run A-old --method fedbn-proto "${short[@]}" "${old[@]}"
run B-recalibrated-bn --method fedbn-proto "${short[@]}" --set fedavg-weights=dataset
run C-equal-weights --method fedbn-proto "${short[@]}"
run D-30x21-rounds --method fedbn-proto "${long[@]}"
run E-prototype-weight-8 --method fedbn-proto "${long[@]}" --set prototype-weight=8
run F-3-subprototypes --method fedbn-proto "${long[@]}" --set prototype-weight=8 --set prototypes-per-class=3
run G-adam-reset --method fedbn-proto "${long[@]}" --set prototype-weight=8 --set optimizer-state=reset
run H-fedbn --method fedbn "${long[@]}"
run I-fedprox --method fedprox "${long[@]}"
run J-fedadam --method fedadam "${long[@]}"
run K-contrastive-central --method contrastive --set epochs=6
run L-sepnorm-central --method sepnorm --set epochs=6
