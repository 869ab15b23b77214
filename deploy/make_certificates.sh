#!/usr/bin/env bash
# Certificate authority (CA) and TLS certificate of the SuperLink, made by the federation operator.
#
# Usage: deploy/make_certificates.sh OUT_DIR HOST [HOST...]
#   HOST: every DNS name or IP address under which the hospitals reach the SuperLink (fl.example.org 10.1.2.3).
#         localhost and 127.0.0.1 are always added: the operator's `flwr` reaches the SuperLink there.
#
# Writes, with private keys readable by their owner only:
#   OUT_DIR/ca.crt          public: give it to every hospital (their SuperNodes check the SuperLink with it)
#   OUT_DIR/superlink.crt   stays on the SuperLink machine
#   OUT_DIR/superlink.key   secret, stays on the SuperLink machine
#   CA_DIR/ca.key           secret: keep it offline, never on the SuperLink machine; it signs SuperLink certificates
#   CA_DIR/ca.crt           the same public certificate
# A CA already in CA_DIR is reused, so running the script again renews only the SuperLink certificate; the renewal
# is refused when the certificate would outlive the CA.
# Environment: CA_DIR (default OUT_DIR-ca, beside OUT_DIR), CA_DAYS (CA validity, default 3650),
#              CERT_DAYS (SuperLink certificate validity, default 365).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR HOST [HOST...]" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found: install it (e.g. apt-get install openssl)" >&2; exit 1; }
out=${1%/}
shift
ca_dir=${CA_DIR:-$out-ca}
ca_days=${CA_DAYS:-3650}
days=${CERT_DAYS:-365}
umask 077
mkdir -p "$out" "$ca_dir"

if [ -f "$out/ca.key" ]; then
    echo "WARNING: $out/ca.key is the CA's private key in the SuperLink's secrets folder: whoever takes the" >&2
    echo "         SuperLink machine can then sign certificates the hospitals trust. Move it to $ca_dir." >&2
    [ -f "$ca_dir/ca.key" ] || { mv "$out/ca.key" "$ca_dir/ca.key"; cp "$out/ca.crt" "$ca_dir/ca.crt"; }
fi
if [ ! -f "$ca_dir/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days "$ca_days" \
        -subj "/CN=fl-covid federation CA" -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
elif [ ! -f "$ca_dir/ca.key" ]; then
    echo "$ca_dir/ca.crt exists but $ca_dir/ca.key does not: bring the CA key back or use an empty CA_DIR" >&2
    exit 1
fi
if ! openssl x509 -in "$ca_dir/ca.crt" -noout -checkend $((days * 86400)) >/dev/null; then
    echo "the CA in $ca_dir expires within CERT_DAYS=$days days ($(openssl x509 -in "$ca_dir/ca.crt" -noout \
-enddate)): a certificate must not outlive its CA; lower CERT_DAYS or make a new CA (empty CA_DIR)" >&2
    exit 1
fi

san="DNS:localhost,IP:127.0.0.1,"
for host in "$@"; do
    [[ $host == localhost || $host == 127.0.0.1 ]] && continue
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -subj "/CN=$1" \
    -keyout "$out/superlink.key" -out "$out/superlink.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n%s\n' \
    "${san%,}" "extendedKeyUsage=serverAuth" >"$out/superlink.ext"
openssl x509 -req -in "$out/superlink.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" -CAcreateserial \
    -CAserial "$ca_dir/ca.srl" -days "$days" -extfile "$out/superlink.ext" -out "$out/superlink.crt" 2>/dev/null
rm -f "$out/superlink.csr" "$out/superlink.ext"
cp "$ca_dir/ca.crt" "$out/ca.crt"
chmod 644 "$out/ca.crt" "$ca_dir/ca.crt" "$out/superlink.crt"
openssl verify -CAfile "$out/ca.crt" "$out/superlink.crt" >/dev/null
echo "CA: $out/ca.crt (give to every hospital; its key stays in $ca_dir, keep that offline);" \
    "SuperLink certificate for ${san%,}: $out/superlink.crt"
