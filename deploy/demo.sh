#!/usr/bin/env bash
# The whole hospital deployment on one machine (loopback): a CA and SuperLink certificate, one key pair per site,
# a SuperLink with TLS and SuperNode authentication behind its proxy, both sites registered, one SuperNode per
# site with its own node config and a policy approving this copy of the app, then `flwr run` of 2 rounds of
# configs/smoke.yaml on real CT images, each site pinned to its registered node and every message signed
# (the operator's trust file). Exits non-zero unless the run
# finished as completed with final metrics from both sites. Stops every process it started, also on failure.
#
# Usage: deploy/demo.sh [DATA_ROOT]
#   DATA_ROOT holds site_a_sarscov2/ and site_b_covidct/ (default: the copy embedded in data/).
# Keys and certificates go to deploy/secrets/demo/, everything else to deploy/work/demo/ (both git-ignored).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
data_root=$(cd "${1:-$repo/data}" && pwd)
sites=(site_a_sarscov2 site_b_covidct)
secrets=$repo/deploy/secrets/demo
work=$repo/deploy/work/demo
for tool in openssl ssh-keygen flower-superlink flower-supernode flwr python fl-covid-app-hash; do
    command -v "$tool" >/dev/null || { echo "$tool not found: install it (see docs/deploy.md)" >&2; exit 1; }
done

pids=()
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
stop() {  # a process group we started, and every process below it (the SuperLink's helpers run in their own)
    local pid=$1 all
    all=$(echo "$pid" $(descendants "$pid"))
    kill -TERM -- "-$pid" 2>/dev/null || true
    kill -TERM $all 2>/dev/null || true
    for _ in $(seq 50); do
        ps -p "${all// /,}" >/dev/null 2>&1 || return 0
        sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill -KILL $all 2>/dev/null || true
}
cleanup() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}"; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rm -rf "$secrets" "$work"
mkdir -p "$work"
link_port=$(free_port)
control_port=$(free_port)
export FLWR_HOME=$work/operator FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

echo "== certificates and site keys ($secrets)"
"$repo/deploy/make_certificates.sh" "$secrets" localhost 127.0.0.1
for site in "${sites[@]}"; do "$repo/deploy/make_site_key.sh" "$secrets/sites" "$site"; done
"$repo/deploy/make_signing_key.sh" "$secrets/operator" operator  # signs every instruction of the operator
"$repo/deploy/add_connection.sh" demo "127.0.0.1:$control_port" "$secrets/ca.crt"
digest=$(fl-covid-app-hash "$repo")
for site in "${sites[@]}"; do  # each hospital approves the app it reviewed (here: this copy) and sets its limits
    printf 'approved-apps: [%s]\noperator-key: %s\nallowed-methods: [fedbn, fedbn-proto]\nmax-rounds: 10\n%s\n' \
        "$digest" "$(cat "$secrets/operator/operator.sign.pub")" 'min-prototype-images: 2' \
        >"$secrets/sites/$site.policy.yaml"
done

trust=$secrets/operator/trust.yaml  # the operator's signing key; the sites' nodes and keys once registered
printf 'signing-key: %s\nsites: {}\n' "$secrets/operator/operator.sign.key" >"$trust"

echo "== SuperLink: hospitals' port 127.0.0.1:$link_port, operator's 127.0.0.1:$control_port (log: $work/superlink.log)"
setsid "$repo/deploy/start_superlink.sh" --secrets "$secrets" --state-dir "$work/superlink" \
    --host 127.0.0.1 --port "$link_port" --control-port "$control_port" --trust "$trust" \
    >"$work/superlink.log" 2>&1 &
pids+=($!)
for _ in $(seq 60); do flwr supernode ls demo >/dev/null 2>&1 && break; sleep 1; done
printf 'signing-key: %s\nsites:\n' "$secrets/operator/operator.sign.key" >"$trust"
for site in "${sites[@]}"; do
    out=$(flwr supernode register "$secrets/sites/$site.key.pub" demo)
    echo "$out"
    node=$(echo "$out" | grep -oE '[0-9]{6,}' | head -1)
    [ -n "$node" ] || { echo "FAILED: no node id in the registration of $site" >&2; exit 1; }
    printf '  %s: {node: %s, key: %s}\n' "$site" "$node" "$(cat "$secrets/sites/$site.sign.pub")" >>"$trust"
done

for site in "${sites[@]}"; do
    echo "== SuperNode of $site (log: $work/$site.log)"
    setsid "$repo/deploy/start_supernode.sh" --superlink "127.0.0.1:$link_port" --ca "$secrets/ca.crt" \
        --key "$secrets/sites/$site.key" --signing-key "$secrets/sites/$site.sign.key" --site "$site" \
        --data-dir "$data_root/$site" \
        --state-dir "$work/$site" --policy "$secrets/sites/$site.policy.yaml" --port "$(free_port)" \
        >"$work/$site.log" 2>&1 &
    pids+=($!)
done

online() { flwr supernode ls demo --format json 2>/dev/null | grep -c '"status": "online"' || true; }
for _ in $(seq 60); do
    for i in "${!sites[@]}"; do  # a SuperNode that exited (refused, bad folder) will not come back
        if ! kill -0 "${pids[i + 1]}" 2>/dev/null; then
            tail -n 20 "$work/${sites[i]}.log" >&2
            echo "FAILED: the SuperNode of ${sites[i]} stopped (log: $work/${sites[i]}.log)" >&2
            exit 1
        fi
    done
    [ "$(online)" -ge ${#sites[@]} ] && break
    sleep 2
done
[ "$(online)" -ge ${#sites[@]} ] || { echo "FAILED: the SuperNodes did not connect (logs in $work)" >&2; exit 1; }

echo "== flwr run: 2 rounds of configs/smoke.yaml"
cd "$repo"
timeout 1200 flwr run . demo --stream --run-config "config-file='configs/smoke.yaml' num-server-rounds=2 \
local-steps=2 output-dir='$work/server-runs'" 2>&1 | tee "$work/run.log"
run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$work/run.log" | head -1)
[ -n "$run_id" ] || { echo "FAILED: the run did not start" >&2; exit 1; }
flwr ls demo --run-id "$run_id" --format json >"$work/status.json"
python - "$work/status.json" "$work/server-runs/fedbn-proto-run$run_id/final_metrics.json" "${sites[@]}" <<'EOF'
import json, sys
from pathlib import Path

status_file, final_file, *sites = sys.argv[1:]
status = json.loads(Path(status_file).read_text())["runs"][0]["status"]
if status != "finished:completed":
    sys.exit(f"FAILED: run status is {status}")
if not Path(final_file).is_file():
    sys.exit(f"FAILED: no {final_file}")
final = json.loads(Path(final_file).read_text())["sites"]
if sorted(final) != sorted(sites):
    sys.exit(f"FAILED: final metrics cover {sorted(final)}, expected {sorted(sites)}")
for site, m in final.items():
    print(f"{site}: AUC {m['auc']:.3f} accuracy {m['accuracy']:.3f} (n={m['n']})")
print(f"OK: run {status}, results in {Path(final_file).parent}")
EOF
