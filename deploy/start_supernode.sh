#!/usr/bin/env bash
# Run one hospital's SuperNode in the foreground. It connects out to the SuperLink (no inbound port needed at the
# hospital), proves its identity with the site's private key and trains on the site's images, which never leave.
# Every hospital runs this same script; only the arguments differ.
#
# Usage: deploy/start_supernode.sh --superlink HOST:PORT --ca CA_CERT --key SITE_KEY --site SITE
#                                  --data-dir DIR --state-dir DIR [--port 9094]
#   --ca         ca.crt from the operator          --key  private key of deploy/make_site_key.sh
#   --site       the site's name in the experiment config (e.g. site_a_sarscov2)
#   --data-dir   the site's images: COVID/ and NonCOVID/ folders and/or a manifest.csv (read only)
#   --state-dir  the site's own folder: BN statistics, optimizer state, predictions (stays at the hospital)
#   --port       local port the SuperNode uses to run the app on this machine (default 9094)
set -euo pipefail

usage() { sed -n 6,12p "$0" >&2; exit 2; }
superlink="" ca="" key="" site="" data="" state="" port=9094
while [ $# -gt 0 ]; do
    case $1 in
        --superlink) superlink=$2; shift 2 ;;
        --ca) ca=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --site) site=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        --state-dir) state=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        *) usage ;;
    esac
done
for v in "$superlink" "$ca" "$key" "$site" "$data" "$state"; do [ -n "$v" ] || usage; done
fail() { echo "$*" >&2; exit 1; }
[ -f "$ca" ] || fail "CA certificate $ca not found (the operator gives you ca.crt)"
[ -f "$key" ] || fail "private key $key not found (make it with deploy/make_site_key.sh)"
[ -f "$data/manifest.csv" ] || { [ -d "$data/COVID" ] && [ -d "$data/NonCOVID" ]; } ||
    fail "$data must hold the site's COVID/ and NonCOVID/ image folders or a manifest.csv"
abs() { (cd "$1" && pwd); }
umask 077
mkdir -p "$state"
data=$(abs "$data")
state=$(abs "$state")
case "$site$data$state" in *"'"* | *'"'*) fail "site and folders must not contain quotes" ;; esac
export FLWR_HOME=$state/flwr-home FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
exec flower-supernode \
    --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" --port "$port" \
    --node-config "site='$site' data-dir='$data' state-dir='$state'"
