#!/usr/bin/env bash
# The paper's full protocol on a GPU machine: every row of Table I at configs/gpu.yaml (width 1.0, 224 px,
# 100 epochs centralized, 100 rounds x 105 local steps federated), 4 folds x 3 seeds, accumulating in OUT (a
# fold-run already there is skipped, so a later start continues), then the Table I report (OUT/report) and the
# validation pooled over folds with the round-shape frontier (OUT/decision).
#
# Usage: docs/results/gpu/run.sh DATA_ROOT OUT [fl-covid-protocol options, e.g. --stop-after MINUTES]
#   DATA_ROOT: the full-resolution data (shorter side 256 px), e.g. ../shared/data
#   FEDERATION: Flower --federation-config of the federated rows (default: two Ray clients of 4 CPUs and half a
#   GPU each, both on the one GPU)
# Checked end to end on CPU at a tiny size (docs/results.md, "Reproduce on a GPU"):
#   FEDERATION="client-resources-num-cpus=1 client-resources-num-gpus=0" docs/results/gpu/run.sh ../shared/data \
#     /tmp/gpu-tiny --folds 2 --run-folds 0 --seeds 1 --set width=0.125 --set image-size=32 --set epochs=1 \
#     --set num-server-rounds=2 --set local-steps=2 --set device=cpu
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DATA_ROOT OUT [fl-covid-protocol options]" >&2; exit 2; }
data=$(cd "$1" && pwd) || exit 2
out=$2
shift 2
federation=${FEDERATION:-"client-resources-num-cpus=4 client-resources-num-gpus=0.5"}
common=(--config configs/gpu.yaml --set "data-root=$data" --quiet)
failed=()
for m in fedbn-proto fedbn fedavg fedprox fedadam fedbn-series-adapter fedbn-parallel-adapter fedbn-ms-net; do
  fl-covid-protocol --method "$m" "${common[@]}" --engine flower --federation-config "$federation" \
    --out "$out/$m" "$@" || failed+=("$m")
done
for m in single joint sepnorm contrastive series-adapter parallel-adapter ms-net; do
  fl-covid-protocol --method "$m" "${common[@]}" --out "$out/$m" "$@" || failed+=("$m")
done
fl-covid-report "$out" --out "$out/report" --planned 12 || failed+=(report)
fl-covid-decide "$out" --out "$out/decision" || failed+=(decide)
if [ ${#failed[@]} -gt 0 ]; then
  echo "not completed: ${failed[*]} (run again to continue; finished fold-runs are kept)" >&2
  exit 1
fi
