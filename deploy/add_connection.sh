#!/usr/bin/env bash
# Tell the `flwr` command how to reach the SuperLink over TLS: adds [superlink.NAME] to $FLWR_HOME/config.toml
# (default ~/.flwr/config.toml). Afterwards: `flwr supernode register KEY.pub NAME`, `flwr run . NAME --stream`.
#
# Usage: deploy/add_connection.sh NAME HOST:PORT CA_CERT
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 NAME HOST:PORT CA_CERT" >&2
    exit 2
fi
name=$1
address=$2
ca=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
[ -f "$ca" ] || { echo "CA certificate $3 not found (make it with deploy/make_certificates.sh)" >&2; exit 1; }
home=${FLWR_HOME:-$HOME/.flwr}
config=$home/config.toml
mkdir -p "$home"
if [ -f "$config" ] && grep -q "^\[superlink\.$name\]" "$config"; then
    echo "$config already has a connection [superlink.$name]; edit or remove it there" >&2
    exit 1
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$address" "$ca" >>"$config"
echo "connection '$name' -> $address (TLS, CA $ca) added to $config"
