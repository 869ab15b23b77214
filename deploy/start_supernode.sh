#!/usr/bin/env bash
# Run one hospital's SuperNode in the foreground. It connects out to the SuperLink (no inbound port needed at the
# hospital), proves its identity with the site's private key and trains on the site's images, which never leave.
# It runs only app bundles whose SHA-256 the site policy approves (the ClientApp process is fl-covid-clientapp,
# which checks the bundle before any of its code runs), starts no other task process (agentapp, serverapp,
# simulation, connector, model: stand-ins that refuse), runs only instructions the operator signed (operator-key of
# the policy), signs its replies with the site's signing key, and refuses runs that break the policy.
# Every hospital runs this same script; only the arguments differ.
#
# Usage: deploy/start_supernode.sh --superlink HOST:PORT --ca CA_CERT --key SITE_KEY --signing-key SIGN_KEY
#                                  --site SITE --data-dir DIR --state-dir DIR --policy FILE [--port 9094]
#   --ca         ca.crt from the operator          --key  private key of deploy/make_site_key.sh
#   --signing-key  SITE.sign.key of deploy/make_site_key.sh: signs the site's replies
#   --site       the site's name in the experiment config (e.g. site_a_sarscov2)
#   --data-dir   the site's images: COVID/ and NonCOVID/ folders and/or a manifest.csv (read only)
#   --state-dir  the site's own folder: BN statistics, optimizer state, models, predictions (stays at the hospital)
#   --policy     the site's policy (YAML, see deploy/site-policy.example.yaml): approved apps, methods, DP, caps
#   --port       local port the SuperNode uses to run the app on this machine (default 9094)
set -euo pipefail

usage() { sed -n 10,18p "$0" >&2; exit 2; }
superlink="" ca="" key="" sign="" site="" data="" state="" policy="" port=9094
while [ $# -gt 0 ]; do
    case $1 in
        --superlink) superlink=$2; shift 2 ;;
        --ca) ca=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --signing-key) sign=$2; shift 2 ;;
        --site) site=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        --state-dir) state=$2; shift 2 ;;
        --policy) policy=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        *) usage ;;
    esac
done
for v in "$superlink" "$ca" "$key" "$sign" "$site" "$data" "$state" "$policy"; do [ -n "$v" ] || usage; done
fail() { echo "$*" >&2; exit 1; }
[ -f "$ca" ] || fail "CA certificate $ca not found (the operator gives you ca.crt)"
[ -f "$key" ] || fail "private key $key not found (make it with deploy/make_site_key.sh)"
[ -f "$sign" ] || fail "signing key $sign not found (make it with deploy/make_site_key.sh)"
[ -f "$policy" ] || fail "site policy $policy not found (start from deploy/site-policy.example.yaml)"
[ -f "$data/manifest.csv" ] || { [ -d "$data/COVID" ] && [ -d "$data/NonCOVID" ]; } ||
    fail "$data must hold the site's COVID/ and NonCOVID/ image folders or a manifest.csv"
python=$(python3 -c 'import sys; print(sys.executable)')
"$python" -I -c "import clients.guard" 2>/dev/null || fail "fl-covid is not installed for $python (pip install .)"
abs() { (cd "$1" && pwd); }
umask 077
mkdir -p "$state/.bin"
data=$(abs "$data")
state=$(abs "$state")
policy=$(abs "$(dirname "$policy")")/$(basename "$policy")
sign=$(abs "$(dirname "$sign")")/$(basename "$sign")
case "$site$data$state$policy$sign" in *"'"* | *'"'*) fail "site, folders and policy must not contain quotes" ;; esac
"$python" -I - "$policy" "$site" "$sign" <<'PY' || fail "the site policy $policy or signing key $sign is not usable (see above)"
import sys
from pathlib import Path
from fl_covid.errors import ConfigError
from fl_covid.policy import load_site_policy
from fl_covid.trust import NotTrusted, load_private_key
try:
    policy = load_site_policy(Path(sys.argv[1]))
    load_private_key(Path(sys.argv[3]))
except (ConfigError, NotTrusted) as e:
    sys.exit(str(e))
if not policy.approved_apps:
    sys.exit("the policy approves no app: list the SHA-256 of the reviewed app (fl-covid-app-hash) in approved-apps")
if not policy.operator_key:
    sys.exit("the policy has no operator-key: put the operator's public signing key (OPERATOR.sign.pub) there")
print(f"site {sys.argv[2]}: {len(policy.approved_apps)} approved app(s), methods {', '.join(policy.allowed_methods)}")
PY
# the SuperNode launches the ClientApp process by this name; -I: no code from the working folder or PYTHONPATH
printf '#!/bin/sh\nexec "%s" -I -c "from clients.guard import main; main()" "$@"\n' "$python" >"$state/.bin/flwr-clientapp"
chmod 700 "$state/.bin/flwr-clientapp"
# every other task process a SuperNode may start (a bundle declaring an agentapp, ...): refused before any of the
# bundle's code runs (clients/guard.py refuse)
for task in $("$python" -I -c "from clients.guard import REFUSED_TASKS; print(*REFUSED_TASKS)"); do
    printf '#!/bin/sh\nexec "%s" -I -c "from clients.guard import refuse; refuse(\\"%s\\")" "$@"\n' "$python" "$task" \
        >"$state/.bin/$task"
    chmod 700 "$state/.bin/$task"
done
# the SuperNode starts its SuperExec, which starts the task processes, by name from PATH: both run from this
# interpreter directly, never through a wrapper (a pyenv shim, say) that would put other programs first on PATH
printf '#!/bin/sh\nexec "%s" -I -c "import sys; from flwr.supercore.cli import flower_superexec; sys.argv[0] = \\"flower-superexec\\"; flower_superexec()" "$@"\n' \
    "$python" >"$state/.bin/flower-superexec"
chmod 700 "$state/.bin/flower-superexec"
export PATH=$state/.bin:$PATH FL_COVID_SITE_POLICY=$policy
export FLWR_HOME=$state/.flwr-home FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
exec "$python" -I -c "import sys; from flwr.supernode.cli import flower_supernode; sys.argv[0] = 'flower-supernode'; flower_supernode()" \
    --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" --port "$port" \
    --node-config "site='$site' data-dir='$data' state-dir='$state' policy='$policy' signing-key='$sign'"
