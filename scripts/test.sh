#!/usr/bin/env bash
# The whole test suite, in stages: formatting, lints, no import cycle among a crate's files
# (scripts/import-cycles.py), unit and whole-server tests (cargo), the
# official-SDK compatibility suite (npm + PyPI SDKs against a spawned dps on ports 443 and 8883
# in a private network namespace), the OpenAPI check (docs/openapi.json against a spawned dps on
# free loopback ports: pinned schemathesis from PyPI plus tests/openapi/live.py's cases), and a
# bounded run of every fuzz target (DPS_FUZZ_SECS seconds each, default 20; 0 skips that stage,
# and the summary says so). Installs what it needs on first run. Used by CI (.ci/run).
#
# Every stage runs even when an earlier one failed (a formatting slip must not hide a failing
# test). At the end — also when interrupted — it prints each stage's status and one closing
# line `N passed, M failed` over all stages: cargo and compat count their cases, openapi its
# checks (cases and schemathesis operations), fuzz its targets, fmt and clippy count as one check
# each. The exit status is 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need ip || missing+=(iproute2)
need unshare || missing+=(util-linux)
need node || missing+=(nodejs)
need npm || missing+=(npm)
need python3 || missing+=(python3)
need openssl || missing+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
need swtpm || missing+=(swtpm swtpm-tools)
need tpm2_import || missing+=(tpm2-tools)
# dps-device's `tpm` feature (built and tested below) links tss-esapi against tpm2-tss.
need pkg-config || missing+=(pkg-config)
pkg-config --exists tss2-esys 2>/dev/null || missing+=(libtss2-dev)
# The PostgreSQL tests start a server of their own for the outage test (initdb, pg_ctl as the
# postgres user); the shared server is DPS_TEST_POSTGRES_URL (default 127.0.0.1:5432, db test).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
need runuser || missing+=(util-linux)
# The multi-node test puts HAProxy (the docs/multi-node.md configuration) in front of two nodes.
need haproxy || missing+=(haproxy)
# The Mosquitto registrar tests start brokers of their own with the dynamic-security plugin.
need mosquitto || missing+=(mosquitto)
need mosquitto_ctrl || missing+=(mosquitto-clients)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" || { echo "test: could not install ${missing[*]}"; exit 1; }
fi

logs="$(mktemp -d)"
stages=()    # "name|status|passed|failed|seconds"
current=""   # the stage running now (for the summary if interrupted)
started_at=0
total_passed=0
total_failed=0

summary() {
  local code=$?
  if [ -n "$current" ]; then
    stages+=("$current|interrupted|0|1|$(( $(date +%s) - started_at ))")
    total_failed=$((total_failed + 1))
  fi
  echo
  echo "== summary"
  local s name status p f secs
  for s in "${stages[@]}"; do
    IFS='|' read -r name status p f secs <<< "$s"
    printf '%-10s %-12s %6s passed %4s failed %5ss\n' "$name" "$status" "$p" "$f" "$secs"
  done
  echo "$total_passed passed, $total_failed failed"
  rm -rf "$logs"
  if [ "$total_failed" != 0 ] || [ "$code" != 0 ]; then exit 1; fi
}
trap summary EXIT
trap 'exit 130' INT TERM

# stage NAME COUNTER COMMAND...: runs COMMAND with its output shown and kept; COUNTER reads
# "P F" (cases passed and failed) from the kept output. A stage that exits non-zero counts at
# least one failure, even when its output names none.
stage() {
  local name="$1" counter="$2"
  shift 2
  echo "== $name"
  current="$name"
  started_at=$(date +%s)
  "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  local p f
  read -r p f < <("$counter" "$logs/$name.log" "$rc")
  if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; fi
  local status=ok
  [ "$rc" = 0 ] || status=FAILED
  stages+=("$name|$status|$p|$f|$(( $(date +%s) - started_at ))")
  current=""
  total_passed=$((total_passed + p))
  total_failed=$((total_failed + f))
}
# A check with no cases of its own: one passed or one failed.
one_check() { if [ "$2" = 0 ]; then echo "1 0"; else echo "0 1"; fi; }
# cargo test: the sum over every "test result:" line.
cargo_cases() {
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
       END { print p + 0, f + 0 }' "$1"
}
# compat, openapi and fuzz: their closing "…: P passed, F failed" line.
closing_line() {
  local line
  line=$(grep -E '^(compat|openapi|fuzz): [0-9]+ passed, [0-9]+ failed$' "$1" | tail -1)
  if [ -n "$line" ]; then
    echo "$line" | sed -E 's/^[a-z]+: ([0-9]+) passed, ([0-9]+) failed$/\1 \2/'
  else
    echo "0 0"
  fi
}

stage fmt one_check cargo fmt --all -- --check
# With TPM attestation in dps-device and `dps device` (the `tpm` feature, off by default).
stage clippy one_check cargo clippy --workspace --all-targets --locked --features dps-cli/tpm -- -D warnings
stage imports one_check python3 scripts/import-cycles.py crates
stage dashboard one_check python3 scripts/check-dashboard.py docs/grafana-dashboard.json
stage cargo cargo_cases cargo test --workspace --locked --features dps-cli/tpm
# suite NAME SCRIPT: a suite run against the dps binary the cargo stage built.
suite() {
  if [ -x target/debug/dps ]; then
    stage "$1" closing_line bash "$2" target/debug/dps
  else
    stages+=("$1|FAILED|0|1|0")
    total_failed=$((total_failed + 1))
    echo "== $1: not run (no target/debug/dps: the cargo stage did not build it)"
  fi
}
suite compat tests/compat/run.sh
suite openapi tests/openapi/run.sh
fuzz_secs="${DPS_FUZZ_SECS:-20}"
if [ "$fuzz_secs" != 0 ]; then
  stage fuzz closing_line bash scripts/fuzz.sh "$fuzz_secs"
else
  echo "== fuzz: skipped (DPS_FUZZ_SECS=0)"
  stages+=("fuzz|skipped|0|0|0")
fi
