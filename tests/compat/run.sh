#!/usr/bin/env bash
# Official-SDK compatibility suite: installs the pinned SDKs (npm and PyPI) on first run,
# then, inside a private network namespace (so dps can take port 443 as the SDKs expect,
# without touching the host's ports), starts fresh dps servers and drives them with:
#   - node/suite.js      npm azure-iot-provisioning-service + -device + -device-http + -device-mqtt
#   - node/tpm.js        the Node TPM client (-device-http + azure-iot-security-tpm) against swtpm
#   - node/amqp.js       the Node device client over AMQP and AMQP over WebSocket (-device-amqp
#                        `Amqp` on 5671, `AmqpWs` on 443): keys, X.509, TPM (SASL TPM, same swtpm)
#   - python/suite.py    PyPI azure-iot-deviceprovisioning + azure-iot-device
# each under a time limit, and checks that each ran its expected number of cases to the end.
# Usage: tests/compat/run.sh [path/to/dps]   (default: target/release/dps, else target/debug/dps)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=../find-dps.sh
. "$here/../find-dps.sh"
find_dps compat "${1:-}"

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
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

# start_dps NAME TOML-EXTRA [LOG-FILTER]: a fresh dps with its own data directory, logging
# to $work/NAME/dps.log at LOG-FILTER (default "info"; TOML-EXTRA must not set `log`); waits
# for its dev-credentials.json.
start_dps() {
  local name="$1" extra="$2" log="${3:-info}" dir="$work/$1"
  mkdir -p "$dir"
  printf 'data_dir = "%s/data"\nlog = "%s"\n%s\n' "$dir" "$log" "$extra" > "$dir/dps.toml"
  "$dps" serve --config "$dir/dps.toml" > "$dir/dps.out" 2> "$dir/dps.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    [ -f "$dir/data/dev-credentials.json" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$dir/dps.log"; echo "compat: dps ($name) exited early"; exit 1; }
    sleep 0.1
  done
  cat "$dir/dps.log"; echo "compat: dps ($name) did not start"; exit 1
}

# The main server, as a user would run it, with two linked hubs.
main_config="$(cat <<'TOML'
[listen]
https = "127.0.0.1:443"
mqtt = "127.0.0.1:8883"
amqp = "127.0.0.1:5671"
[[hubs]]
host_name = "hub-a.compat.test"
[[hubs]]
host_name = "hub-b.compat.test"
allocation_weight = 3
# A built-in rule set for the rules:// cases.
[[rules]]
name = "by-model"
payload_schema = '{"type": "object", "required": ["modelId"], "properties": {"modelId": {"type": "string"}}}'
[[rules.cases]]
when = "payload.modelId.startsWith('thermo-')"
hub = "'hub-a.compat.test'"
payload = "{'telemetryTopic': 'thermo/' + registrationId, 'group': enrollmentGroupId}"
[[rules.cases]]
when = "true"
# The documented example webhook (examples/allocation-webhook.py) checks signatures.
[[webhooks]]
url_prefix = "http://127.0.0.1:8081/"
secret = "compat-example-webhook-secret"
TOML
)"
start_dps main "$main_config"
# A second server on another loopback address that answers "assigning" first, so that the
# device clients' polling path is exercised too, with an ECDSA server certificate (the main
# server's is RSA, the default). It logs every answered poll (`operation polled`, debug), which
# the polling cases count.
start_dps strict '[listen]
https = "127.0.0.2:443"
mqtt = "127.0.0.2:8883"
amqp = "127.0.0.2:5671"
[tls]
host_names = ["127.0.0.2"]
generated_key = "ecdsa-p256"
[device]
assigning_first = true
retry_after_secs = 1' 'info,dps_core=debug'
# A third server that throttles each device to one request per 2 s, so that the clients'
# back-off on 429 + retry-after is exercised.
start_dps throttled '[listen]
https = "127.0.0.3:443"
mqtt = "127.0.0.3:8883"
amqp = "127.0.0.3:5671"
[tls]
host_names = ["127.0.0.3"]
[throttling]
device_requests_per_min = 30
device_requests_burst = 1'
# A custom allocation webhook (Node, plain HTTP) for the custom allocation cases.
WEBHOOK_PORT=8080 node "$here/node/webhook.js" > "$work/webhook.log" 2>&1 &
pids+=($!)
export DPS_WEBHOOK_URL="http://127.0.0.1:8080/api/alloc?code=compat-function-key"
# The example webhook of docs/allocation.md, as documented.
DPS_WEBHOOK_SECRET=compat-example-webhook-secret python3 "$root/examples/allocation-webhook.py" 8081 \
  > "$work/example-webhook.log" 2>&1 &
pids+=($!)
export DPS_EXAMPLE_WEBHOOK_URL="http://127.0.0.1:8081/alloc"
# Software TPMs for the Node TPM client (node/tpm.js): the device's swtpm (raw TPM commands on
# TCP 2421, control 2422) behind tpm/mssim-shim.py on 2321/2322, the Microsoft TPM simulator
# protocol that tss.js speaks in simulator mode (`new Tpm(true)`); and a second swtpm (2431/2432)
# whose EK is "another TPM's" for the wrong-EK case. Fresh states: each run has new EKs. node/amqp.js
# uses the device's swtpm too, after node/tpm.js (the suites run one at a time).
command -v swtpm > /dev/null && command -v tpm2_createek > /dev/null \
  || { echo "compat: swtpm and tpm2-tools are needed (apt-get install swtpm swtpm-tools tpm2-tools)"; exit 2; }
tpm="$work/tpm"
start_swtpm() { # start_swtpm NAME PORT: data on PORT, control on PORT+1
  mkdir -p "$tpm/$1"
  swtpm socket --tpm2 --tpmstate dir="$tpm/$1" --flags not-need-init,startup-clear \
    --server type=tcp,port="$2",bindaddr=127.0.0.1 --ctrl type=tcp,port=$(($2 + 1)),bindaddr=127.0.0.1 \
    > "$tpm/$1.log" 2>&1 &
  pids+=($!)
}
start_swtpm device 2421
start_swtpm other 2431
python3 "$here/tpm/mssim-shim.py" --listen 2321 --swtpm 2421 > "$tpm/shim.log" 2>&1 &
pids+=($!)
export DPS_TPM_SIMULATOR=127.0.0.1:2321
for port in 8080 8081 2421 2422 2431 2432 2321 2322; do
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    [ "$i" = 100 ] && { tail -n 5 "$work"/*.log "$tpm"/*.log || true; echo "compat: nothing listens on 127.0.0.1:$port"; exit 1; }
    sleep 0.1
  done
done
TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=2431" tpm2_createek -c - -G rsa -u "$tpm/other-ek.pub" > /dev/null \
  || { cat "$tpm/other.log"; echo "compat: could not read the second swtpm's EK"; exit 1; }
DPS_TPM_OTHER_EK="$(base64 -w0 "$tpm/other-ek.pub")"
export DPS_TPM_OTHER_EK
# A test PKI (openssl): root and intermediate CAs, device certificates (leaf + intermediate
# chains) for the X.509 cases, and a self-signed device for an individual enrollment. The root
# is put in the certificate store as verified, as an operator would with `dps cert add`.
pki="$work/pki"
mkdir -p "$pki"
ca_ext='basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign,digitalSignature'
leaf_ext='basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth'
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
newkey "$pki/root.key"
openssl req -x509 -new -key "$pki/root.key" -subj "/CN=Compat Test Root" -days 30 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$pki/root.pem" 2>/dev/null
issue() { # issue NAME CN ISSUER EXT
  newkey "$pki/$1.key"
  openssl req -new -key "$pki/$1.key" -subj "/CN=$2" -out "$pki/$1.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/$3.pem" -CAkey "$pki/$3.key" -CAcreateserial -days 30 \
    -extfile <(printf '%s\n' "$4") -out "$pki/$1.pem" 2>/dev/null
}
issue inter "Compat Test Intermediate" root "$ca_ext"
for id in compat-x509-node-http compat-x509-node-mqtt compat-x509-node-mqttws compat-x509-py-mqtt compat-x509-py-ws \
  compat-x509-node-amqp compat-x509-node-amqpws compat-x509-node-amqp-member compat-x509-node-amqpws-member; do
  issue "$id" "$id" inter "$leaf_ext"
  cat "$pki/$id.pem" "$pki/inter.pem" > "$pki/$id.chain.pem"
done
newkey "$pki/compat-x509-solo.key"
openssl req -x509 -new -key "$pki/compat-x509-solo.key" -subj "/CN=compat-x509-solo" -days 30 \
  -addext "extendedKeyUsage=clientAuth" -out "$pki/compat-x509-solo.pem" 2>/dev/null
cp "$pki/compat-x509-solo.pem" "$pki/compat-x509-solo.chain.pem"
"$dps" cert add compat-root "$pki/root.pem" --verified --data-dir "$work/main/data" > /dev/null
export DPS_PKI="$pki"
export DPS_CREDENTIALS="$work/main/data/dev-credentials.json"
export DPS_STRICT_CREDENTIALS="$work/strict/data/dev-credentials.json"
export DPS_THROTTLED_CREDENTIALS="$work/throttled/data/dev-credentials.json"
export DPS_THROTTLED_LOG="$work/throttled/dps.log"
export DPS_STRICT_LOG="$work/strict/dps.log"
export DPS_MAIN_LOG="$work/main/dps.log"
cat "$work/main/data/tls/ca.pem" "$work/strict/data/tls/ca.pem" "$work/throttled/data/tls/ca.pem" > "$work/ca-bundle.pem"
export NODE_EXTRA_CA_CERTS="$work/ca-bundle.pem"

# --- run the suites -----------------------------------------------------------------------
# The number of cases each suite must report: a case that silently disappears (a loop that
# runs no more, a promise that never settles and lets node exit early) fails the run.
node_cases=44
tpm_cases=9
amqp_cases=17
python_cases=26
suite_timeout=600
problems=0
suite_problem() { # suite_problem NAME MESSAGE
  echo "compat: $1 suite: $2"
  problems=$((problems + 1))
}
# run_suite NAME EXPECTED COMMAND...: runs one suite under `timeout`, then checks that it ended
# with its summary line `NAME: P passed, F failed`, that P + F is EXPECTED and matches its
# `ok -` / `not ok -` lines, and that its exit code agrees. The first miss counts as a failure.
run_suite() {
  local name="$1" expected="$2" out="$work/$1.txt" rc summary p f
  shift 2
  set +e
  timeout --kill-after=10 "$suite_timeout" "$@" | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  summary="$(grep -E "^$name: [0-9]+ passed, [0-9]+ failed\$" "$out" | tail -n 1 || true)"
  p=$(grep -c "^ok - $name: " "$out" || true)
  f=$(grep -c "^not ok - $name: " "$out" || true)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    suite_problem "$name" "timed out after $suite_timeout s (killed) after $((p + f)) of $expected cases"
  elif [ -z "$summary" ]; then
    suite_problem "$name" "no closing '$name: P passed, F failed' line (exit code $rc; it stopped after $((p + f)) of $expected cases)"
  elif [ "$summary" != "$name: $p passed, $f failed" ]; then
    suite_problem "$name" "its summary '$summary' disagrees with its $p ok and $f not ok lines"
  elif [ $((p + f)) != "$expected" ]; then
    suite_problem "$name" "ran $((p + f)) cases, expected $expected (${name}_cases in run.sh)"
  elif [ "$rc" != 0 ] && [ "$f" = 0 ]; then
    suite_problem "$name" "exited with code $rc without a failing case"
  fi
}
run_suite node "$node_cases" node "$here/node/suite.js"
run_suite tpm "$tpm_cases" node "$here/node/tpm.js"
run_suite amqp "$amqp_cases" node "$here/node/amqp.js"
run_suite python "$python_cases" "$venv/bin/python" "$here/python/suite.py"

p=$(cat "$work/node.txt" "$work/tpm.txt" "$work/amqp.txt" "$work/python.txt" | grep -c '^ok - ' || true)
f=$(cat "$work/node.txt" "$work/tpm.txt" "$work/amqp.txt" "$work/python.txt" | grep -c '^not ok - ' || true)
f=$((f + problems))
status=0
if [ "$f" != 0 ]; then
  echo "--- dps log (last 60 lines) ---"; tail -n 60 "$work/main/dps.log"
  status=1
fi
echo "compat: $p passed, $f failed"
exit "$status"
