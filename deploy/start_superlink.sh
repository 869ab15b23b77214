#!/usr/bin/env bash
# Run the federation's SuperLink in the foreground: TLS on, only registered SuperNodes admitted, no dependency
# installation at run time (the machine's own Python environment runs the app).
#
# Usage: deploy/start_superlink.sh --secrets DIR --state-dir DIR [--host 0.0.0.0] [--port 8000]
#   --secrets    folder of deploy/make_certificates.sh (ca.crt, superlink.crt, superlink.key)
#   --state-dir  the SuperLink's own folder: database of runs and registered nodes, installed apps
#   --host       address to listen on (default 0.0.0.0, every interface; 127.0.0.1 for a test on one machine)
#   --port       one HTTPS port serves SuperNodes, `flwr` commands and the ServerApp (default 8000)
# Stop it with Ctrl-C or SIGTERM. The ServerApp writes results under the run config's output-dir on this machine.
set -euo pipefail

usage() { sed -n 5,9p "$0" >&2; exit 2; }
secrets="" state="" host=0.0.0.0 port=8000
while [ $# -gt 0 ]; do
    case $1 in
        --secrets) secrets=$2; shift 2 ;;
        --state-dir) state=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$secrets" ] && [ -n "$state" ] || usage
for f in ca.crt superlink.crt superlink.key; do
    [ -f "$secrets/$f" ] || { echo "$secrets/$f not found: run deploy/make_certificates.sh first" >&2; exit 1; }
done
umask 077
mkdir -p "$state"
export FLWR_HOME=$state/flwr-home FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
exec flower-superlink \
    --ssl-ca-certfile "$secrets/ca.crt" --ssl-certfile "$secrets/superlink.crt" --ssl-keyfile "$secrets/superlink.key" \
    --enable-supernode-auth --disable-runtime-dependency-installation \
    --database "$state/superlink.db" --host "$host" --port "$port"
