#!/usr/bin/env bash
# Official-SDK compatibility suite: installs the pinned SDKs (npm and PyPI) on first run,
# then, inside a private network namespace (so dps can take port 443 as the SDKs expect,
# without touching the host's ports), starts a fresh dps and drives it with:
#   - node/suite.js      npm azure-iot-provisioning-service + -device + -device-http
#   - python/suite.py    PyPI azure-iot-deviceprovisioning
# Usage: tests/compat/run.sh [path/to/dps]   (default: target/release/dps, else target/debug/dps)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dps="${1:-}"
if [ -z "$dps" ]; then
  for c in "$root/target/release/dps" "$root/target/debug/dps"; do
    [ -x "$c" ] && { dps="$c"; break; }
  done
fi
[ -x "$dps" ] || { echo "compat: no dps binary; build it first (cargo build --release -p dps-cli)"; exit 2; }

# --- install the pinned SDKs --------------------------------------------------------------
if [ ! -d "$here/node_modules/azure-iot-provisioning-service" ] || [ "$here/package-lock.json" -nt "$here/node_modules/.package-lock.json" ]; then
  echo "compat: installing npm packages (package-lock.json)"
  (cd "$here" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  echo "compat: installing PyPI packages (requirements.txt)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi

# --- run inside a private network namespace ----------------------------------------------
if [ "${DPS_COMPAT_IN_NETNS:-}" != 1 ]; then
  exec unshare -rn env DPS_COMPAT_IN_NETNS=1 bash "$0" "$dps"
fi
ip link set lo up

work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/dps.toml" <<TOML
data_dir = "$work/data"
log = "info"
[listen]
https = "127.0.0.1:443"
[[hubs]]
host_name = "hub-a.compat.test"
[[hubs]]
host_name = "hub-b.compat.test"
allocation_weight = 3
TOML
"$dps" serve --config "$work/dps.toml" > "$work/dps.out" 2> "$work/dps.log" &
pid=$!
for _ in $(seq 1 100); do
  [ -f "$work/data/dev-credentials.json" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/dps.log"; echo "compat: dps exited early"; exit 1; }
  sleep 0.1
done
[ -f "$work/data/dev-credentials.json" ] || { cat "$work/dps.log"; echo "compat: dps did not start"; exit 1; }
export DPS_CREDENTIALS="$work/data/dev-credentials.json"
export NODE_EXTRA_CA_CERTS="$work/data/tls/ca.pem"

status=0
node "$here/node/suite.js" | tee "$work/node.txt" || status=1
"$venv/bin/python" "$here/python/suite.py" | tee "$work/python.txt" || status=1

p=$(cat "$work/node.txt" "$work/python.txt" | grep -c '^ok - ' || true)
f=$(cat "$work/node.txt" "$work/python.txt" | grep -c '^not ok - ' || true)
if [ "$status" != 0 ] || [ "$f" != 0 ]; then
  echo "--- dps log (last 60 lines) ---"; tail -n 60 "$work/dps.log"
  status=1
fi
echo "compat: $p passed, $f failed"
exit "$status"
