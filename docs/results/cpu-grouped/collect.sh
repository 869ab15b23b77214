#!/usr/bin/env bash
# Copy each fold-run's final_metrics.json and config.json (small files, no weights) from fl-covid-protocol folders
# into docs/results/cpu-grouped/runs/<method>/<fold-seed>/, then rebuild table.md, table.csv and ttests.csv there.
# Usage: docs/results/cpu-grouped/collect.sh PROTOCOL_DIR...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for dir in "$@"; do
  for final in "$dir"/fold*-seed*/*/final_metrics.json; do
    run=$(dirname "$final")
    split=$(basename "$(dirname "$run")")
    method=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['method'])" "$final")
    mkdir -p "$here/runs/$method/$split"
    cp "$final" "$run/config.json" "$here/runs/$method/$split/"
  done
done
fl-covid-report "$here/runs" --out "$here"
