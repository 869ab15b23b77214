#!/usr/bin/env bash
# Table I from every fold-run so far: the centralized rows (runs/<method>/) and the federated rows at the chosen
# round shape, 63 rounds x 10 local steps (../frontier/<method>-ls10/; the sgd-lr folders there are a decision's
# variants, not rows). Writes table.md, table.csv, claims.csv, ttests.csv and the ROC overlays here.
# Usage: docs/results/cpu-grouped/report.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fl-covid-report "$here/runs" "$here"/../frontier/*-ls10 --out "$here" --planned 12
