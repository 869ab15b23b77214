#!/usr/bin/env bash
# The ablation of the federated levers on the validation splits (4 folds x seed 0, grouped protocol, the CPU
# setting of configs/default.yaml at a budget of 630 local steps of 16 images per site).
# Usage: docs/results/ablation/run.sh OUT VARIANT...   (no VARIANT: all); results in OUT/<variant>/;
# table: python docs/results/ablation/table.py OUT > docs/results/ablation/table.md
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=${1:-runs/ablation}
shift || true
common=(--config configs/default.yaml --folds 4 --seeds 1 --jobs 2 --quiet)
r6=(--set num-server-rounds=6 --set local-steps=105 --set eval-every=5)
r30=(--set num-server-rounds=30 --set local-steps=21 --set eval-every=10)
r105=(--set num-server-rounds=105 --set local-steps=6 --set eval-every=35 --set prototype-every=5)
data=(--set fedavg-weights=dataset)
declare -A variants=(
  [A-old]="--method fedbn-proto ${r6[*]} ${data[*]} --set bn-recalibration=false --set summary-images=0"
  [B-recalibrated-bn]="--method fedbn-proto ${r6[*]} ${data[*]}"
  [C-equal-weights]="--method fedbn-proto ${r6[*]} --set fedavg-weights=equal"
  [D-30x21]="--method fedbn-proto ${r30[*]} ${data[*]}"
  [D2-105x6]="--method fedbn-proto ${r105[*]} ${data[*]}"
  [D3-105x6-equal]="--method fedbn-proto ${r105[*]} --set fedavg-weights=equal"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${!variants[@]}")
mkdir -p "$out"
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  fl-covid-protocol "${common[@]}" --out "$out/$name" ${variants[$name]} ${EXTRA:-} >"$out/$name.log" 2>&1 || true
done
