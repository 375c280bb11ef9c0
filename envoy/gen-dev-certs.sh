#!/usr/bin/env bash
# Makes development TLS material in DIR (default .run/certs): a CA, the gateway's
# server certificate (localhost, 127.0.0.1), and for the mutual TLS between Envoy
# and the sidecar a sidecar server certificate (sidecar.local) and Envoy's client
# certificate (envoy.local: the edge identity the sidecar trusts). other-client is a
# client certificate from the same CA that is not the edge's (the sidecar refuses
# it; the tests show so). Never for production.
set -euo pipefail
dir="${1:-.run/certs}"
mkdir -p "$dir"
cd "$dir"
if [[ -f ca.pem && -f server.pem && -f envoy-client.pem && -f sidecar.pem && -f other-client.pem ]]; then
  echo "dev certificates exist in $dir"; exit 0
fi
command -v openssl >/dev/null || { echo "error: openssl is required" >&2; exit 1; }
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
  -subj "/CN=edge-gw dev CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue() { # name subject-alt-names extended-key-usage
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$2" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server "DNS:localhost,IP:127.0.0.1,IP:::1" serverAuth
issue sidecar "DNS:sidecar.local,DNS:localhost,IP:127.0.0.1" serverAuth
issue envoy-client "DNS:envoy.local" clientAuth
issue other-client "DNS:other.local" clientAuth
chmod 644 ./*.pem
echo "dev certificates written to $dir"
