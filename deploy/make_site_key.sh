#!/usr/bin/env bash
# The key pair that identifies one hospital's SuperNode to the SuperLink (ECDSA, NIST P-384), made at the hospital.
#
# Usage: deploy/make_site_key.sh OUT_DIR SITE
# Writes OUT_DIR/SITE.key (secret: never leaves the hospital) and OUT_DIR/SITE.key.pub (send it to the operator,
# who registers it). An existing key is never overwritten.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 OUT_DIR SITE" >&2
    exit 2
fi
command -v ssh-keygen >/dev/null || {
    echo "ssh-keygen not found: install OpenSSH's client tools (e.g. apt-get install openssh-client)" >&2
    exit 1
}
out=$1
site=$2
if [ -e "$out/$site.key" ]; then
    echo "$out/$site.key exists already; delete it first if you really want a new identity for $site" >&2
    exit 1
fi
umask 077
mkdir -p "$out"
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fl-covid $site" -f "$out/$site.key"
echo "private key: $out/$site.key (keep it here); public key: $out/$site.key.pub (send it to the operator)"
