#!/usr/bin/env bash
# An Ed25519 key pair for end-to-end message signatures (fl_covid/trust.py): the operator signs every instruction
# with one, each hospital signs its replies with its own. Made where it is used; the private key never leaves.
#
# Usage: deploy/make_signing_key.sh OUT_DIR NAME
# Writes OUT_DIR/NAME.sign.key (secret, PEM, mode 0600) and OUT_DIR/NAME.sign.pub (the public key: one line of
# base64). The operator's public key goes into each hospital's policy (operator-key); a hospital's goes to the
# operator, into the trust file of the SuperLink machine. An existing key is never overwritten.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 OUT_DIR NAME" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found: install it (e.g. apt-get install openssl)" >&2; exit 1; }
out=$1
name=$2
if [ -e "$out/$name.sign.key" ]; then
    echo "$out/$name.sign.key exists already; delete it first if you really want a new signing key for $name" >&2
    exit 1
fi
umask 077
mkdir -p "$out"
openssl genpkey -algorithm ed25519 -out "$out/$name.sign.key"
# the last 32 bytes of the DER public key are the raw Ed25519 key
openssl pkey -in "$out/$name.sign.key" -pubout -outform DER | tail -c 32 | base64 >"$out/$name.sign.pub"
chmod 644 "$out/$name.sign.pub"
echo "signing key: $out/$name.sign.key (keep it here); public key $(cat "$out/$name.sign.pub") in $out/$name.sign.pub"
