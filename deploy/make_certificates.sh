#!/usr/bin/env bash
# Certificate authority (CA) and TLS certificate of the SuperLink, made by the federation operator.
#
# Usage: deploy/make_certificates.sh OUT_DIR HOST [HOST...]
#   HOST: every DNS name or IP address under which the hospitals reach the SuperLink (fl.example.org 10.1.2.3).
#
# Writes, with private keys readable by their owner only:
#   OUT_DIR/ca.crt          public: give it to every hospital (their SuperNodes check the SuperLink with it)
#   OUT_DIR/ca.key          secret: keep it offline; it signs SuperLink certificates
#   OUT_DIR/superlink.crt   stays on the SuperLink machine
#   OUT_DIR/superlink.key   secret, stays on the SuperLink machine
# A CA already in OUT_DIR is reused, so running the script again renews only the SuperLink certificate.
# Environment: CERT_DAYS (validity in days, default 365).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR HOST [HOST...]" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found: install it (e.g. apt-get install openssl)" >&2; exit 1; }
out=$1
shift
days=${CERT_DAYS:-365}
umask 077
mkdir -p "$out"

if [ ! -f "$out/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days "$days" \
        -subj "/CN=fl-covid federation CA" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
elif [ ! -f "$out/ca.key" ]; then
    echo "$out/ca.crt exists but $out/ca.key does not: bring the CA key back or use an empty OUT_DIR" >&2
    exit 1
fi

san=""
for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -subj "/CN=$1" \
    -keyout "$out/superlink.key" -out "$out/superlink.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "${san%,}" >"$out/superlink.ext"
openssl x509 -req -in "$out/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -extfile "$out/superlink.ext" -out "$out/superlink.crt" 2>/dev/null
rm -f "$out/superlink.csr" "$out/superlink.ext"
chmod 644 "$out/ca.crt" "$out/superlink.crt"
openssl verify -CAfile "$out/ca.crt" "$out/superlink.crt" >/dev/null
echo "CA: $out/ca.crt (give to every hospital); SuperLink certificate for ${san%,}: $out/superlink.crt"
