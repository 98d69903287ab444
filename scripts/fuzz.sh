#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/Cargo.toml) for a bounded time each (default 20 s): the
# MQTT and AMQP codecs, SAS tokens and connection strings, device and service JSON bodies, X.509
# handling, identifiers, topics and HTTP paths, webhook answers, config files, TPM public
# areas and authentication-key blobs. Seeds are in fuzz/corpus/<target>; new inputs go to a
# temporary directory, crashes to fuzz/artifacts/<target>. Usage: scripts/fuzz.sh [seconds per target]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz 0.13.2"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# cargo-fuzz needs nightly-only flags (sanitizers); this toolchain is stable.
export RUSTC_BOOTSTRAP=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root/fuzz"
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^dps-fuzz$')
echo "fuzz: building $(echo "$targets" | wc -w) targets"
build_started=$(date +%s)
cargo metadata --locked --format-version 1 > /dev/null && cargo fuzz build > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; echo "fuzz: build failed"; exit 1; }
echo "fuzz: built in $(( $(date +%s) - build_started ))s"

# Two targets at a time (libFuzzer uses one core each).
run_target() {
  local target="$1"
  mkdir -p "$work/$target"
  if cargo fuzz run "$target" "$work/$target" "corpus/$target" -- \
      -max_total_time="$secs" -max_len=8192 -print_final_stats=1 > "$work/$target.log" 2>&1; then
    echo "fuzz: $target: $(grep -E '^Done [0-9]+ runs' "$work/$target.log" || echo done)"
  else
    echo failed > "$work/$target.failed"
  fi
}
for target in $targets; do
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
  echo "fuzz: $target for ${secs}s"
  run_target "$target" &
done
wait
status=0
passed=0
failed=0
for target in $targets; do
  if [ -f "$work/$target.failed" ]; then
    tail -60 "$work/$target.log"
    echo "fuzz: $target failed (a crash input, if any, is in fuzz/artifacts/$target)"
    status=1
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
done
echo "fuzz: $passed passed, $failed failed"
exit "$status"
