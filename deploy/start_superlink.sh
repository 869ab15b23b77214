#!/usr/bin/env bash
# Run the federation's SuperLink in the foreground behind a reverse proxy that gives the hospitals only what their
# SuperNodes need. Flower 1.42 serves the SuperNodes' Fleet API, the `flwr` Control API and the ServerApp API on
# one port, and its Control API has no authentication; so the SuperLink listens on loopback only, and nginx
# (Debian package nginx-light) serves the hospitals' port, forwarding /v1/fleet/ and refusing every other path.
# The operator runs `flwr` on this machine (or through an SSH tunnel) against 127.0.0.1:CONTROL_PORT.
# TLS everywhere, only registered SuperNodes admitted, no dependency installation at run time; the SuperLink is
# fl-covid-superlink (server/link.py), whose Fleet API refuses a push that is not a reply in the pushing node's name;
# the ServerApp signs every instruction and verifies every reply with the keys of the trust file.
#
# Usage: deploy/start_superlink.sh --secrets DIR --state-dir DIR --trust FILE [--host 127.0.0.1] [--port 8000]
#                                  [--control-port PORT+1]
#   --secrets       folder of deploy/make_certificates.sh (ca.crt, superlink.crt, superlink.key; never ca.key)
#   --state-dir     the SuperLink's own folder: database of runs and registered nodes, installed apps, proxy files
#   --trust         the operator's trust file (YAML): its signing key, and per site the node id and public key
#                   (see docs/deploy.md); read by the ServerApp at the start of every run
#   --host          address the hospitals' port listens on: 127.0.0.1 (default: this machine only, for tests and
#                   SSH tunnels) or the address of the interface facing the hospitals (0.0.0.0: every interface)
#   --port          the hospitals' port: SuperNodes only (default 8000)
#   --control-port  the operator's port on 127.0.0.1: `flwr` commands (default: --port + 1)
# Stop it with Ctrl-C or SIGTERM (both processes stop). The ServerApp writes results under the run config's
# output-dir on this machine.
set -euo pipefail

usage() { sed -n 11,21p "$0" >&2; exit 2; }
secrets="" state="" trust="" host=127.0.0.1 port=8000 control=""
while [ $# -gt 0 ]; do
    case $1 in
        --secrets) secrets=$2; shift 2 ;;
        --state-dir) state=$2; shift 2 ;;
        --trust) trust=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --control-port) control=$2; shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$secrets" ] && [ -n "$state" ] && [ -n "$trust" ] || usage
[ -f "$trust" ] || { echo "trust file $trust not found (see docs/deploy.md, step 5)" >&2; exit 1; }
control=${control:-$((port + 1))}
for f in ca.crt superlink.crt superlink.key; do
    [ -f "$secrets/$f" ] || { echo "$secrets/$f not found: run deploy/make_certificates.sh first" >&2; exit 1; }
done
if [ -f "$secrets/ca.key" ]; then
    echo "WARNING: $secrets/ca.key (the CA's private key) is on the SuperLink machine: move it offline" \
        "(deploy/make_certificates.sh keeps it in a separate CA_DIR)" >&2
fi
nginx=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
[ -n "$nginx" ] || { echo "nginx not found: install it (Debian: apt-get install nginx-light)" >&2; exit 1; }
abs() { (cd "$1" && pwd); }
umask 077
mkdir -p "$state/proxy/tmp"
secrets=$(abs "$secrets")
state=$(abs "$state")
cat >"$state/proxy/nginx.conf" <<CONF
# Written by deploy/start_superlink.sh: the hospitals' port forwards the Fleet API only.
pid $state/proxy/nginx.pid;
error_log $state/proxy/error.log warn;
worker_processes 1;
events { worker_connections 512; }
http {
    access_log $state/proxy/access.log;
    client_body_temp_path $state/proxy/tmp/body;
    proxy_temp_path $state/proxy/tmp/proxy;
    fastcgi_temp_path $state/proxy/tmp/fastcgi;
    uwsgi_temp_path $state/proxy/tmp/uwsgi;
    scgi_temp_path $state/proxy/tmp/scgi;
    server_tokens off;
    upstream superlink {
        server 127.0.0.1:$control;
        keepalive 32;  # reuse TLS connections: a message travels as hundreds of small object requests
    }
    server {
        listen $host:$port ssl;
        ssl_certificate $secrets/superlink.crt;
        ssl_certificate_key $secrets/superlink.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 1g;
        location /v1/fleet/ {
            proxy_pass https://superlink;
            proxy_ssl_trusted_certificate $secrets/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;  # stream bodies: no temporary files (workers may run as another user)
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }
        location / { return 403; }
    }
}
CONF

trust=$(abs "$(dirname "$trust")")/$(basename "$trust")
python=$(python3 -c 'import sys; print(sys.executable)')
# the SuperLink starts its SuperExec (which starts the ServerApp processes) by name from PATH: from this interpreter
# directly, never through a wrapper (a pyenv shim, say) that would put other programs first on PATH
mkdir -p "$state/bin"
printf '#!/bin/sh\nexec "%s" -I -c "import sys; from flwr.supercore.cli import flower_superexec; sys.argv[0] = \\"flower-superexec\\"; flower_superexec()" "$@"\n' \
    "$python" >"$state/bin/flower-superexec"
chmod 700 "$state/bin/flower-superexec"
export PATH=$state/bin:$PATH
export FLWR_HOME=$state/flwr-home FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} FL_COVID_SERVER_TRUST=$trust
pids=()
stop_all() { trap - TERM INT EXIT; kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap 'stop_all; exit 143' TERM INT
trap stop_all EXIT
"$python" -I -c "from server.link import main; main()" \
    --ssl-ca-certfile "$secrets/ca.crt" --ssl-certfile "$secrets/superlink.crt" --ssl-keyfile "$secrets/superlink.key" \
    --enable-supernode-auth --disable-runtime-dependency-installation \
    --database "$state/superlink.db" --host 127.0.0.1 --port "$control" &
pids+=($!)
"$nginx" -p "$state/proxy" -c "$state/proxy/nginx.conf" -e "$state/proxy/error.log" -g "daemon off;" &
pids+=($!)
echo "SuperLink: hospitals' port $host:$port (Fleet API only, via nginx); operator's flwr: 127.0.0.1:$control"
wait -n "${pids[@]}"
status=$?
echo "a SuperLink process stopped (exit $status); stopping the other" >&2
exit "$status"
