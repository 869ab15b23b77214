#!/usr/bin/env bash
# The keys of one hospital, made at the hospital: the key pair that identifies its SuperNode to the SuperLink
# (ECDSA, NIST P-384) and the Ed25519 key pair that signs its replies (deploy/make_signing_key.sh).
#
# Usage: deploy/make_site_key.sh OUT_DIR SITE
# Writes OUT_DIR/SITE.key and OUT_DIR/SITE.sign.key (secret: never leave the hospital), OUT_DIR/SITE.key.pub and
# OUT_DIR/SITE.sign.pub (send both to the operator, who registers the first and puts the second in its trust
# file). An existing key is never overwritten.
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
"$(dirname "$0")/make_signing_key.sh" "$out" "$site" >/dev/null
echo "private keys: $out/$site.key, $out/$site.sign.key (keep them here); public keys: $out/$site.key.pub," \
    "$out/$site.sign.pub (send them to the operator)"
