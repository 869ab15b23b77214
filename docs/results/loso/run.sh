#!/usr/bin/env bash
# Leave-one-site-out fold-runs of `single` at the CPU budget (seed 0; folds FOLDS of 4, default 0), one variant (a
# lever's config overrides) in both directions: docs/results/loso/NAME-without-SITE, accumulating (a fold-run there
# is skipped).
# Usage: [FOLDS=0,1,2,3] docs/results/loso/run.sh NAME [--set KEY=VALUE ...]
#   e.g. docs/results/loso/run.sh crop-equalize --set body-crop=true --set equalize=true
# Then: fl-covid-report --variants docs/results/loso --out docs/results/loso/report
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=$1; shift
for left in site_a_sarscov2 site_b_covidct; do
  trained=$([ "$left" = site_a_sarscov2 ] && echo site_b_covidct || echo site_a_sarscov2)
  fl-covid-protocol --method single --config configs/default.yaml --folds 4 --run-folds "${FOLDS:-0}" --seeds 1 \
    --set epochs=6 "$@" --leave-out "$left" --bn "adapt,site:$trained" --out "$here/$name-without-$left" --quiet
done
