#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a bounded time each (default 60 s): the MQTT codec and the
# DPS MQTT topic grammar. Seeds are in fuzz/corpus/<target>; new inputs go to a temporary
# directory, crashes to fuzz/artifacts/<target>. Usage: scripts/fuzz.sh [seconds]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz 0.13.2"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# cargo-fuzz needs nightly-only flags (sanitizers); this toolchain is stable.
export RUSTC_BOOTSTRAP=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root/fuzz"
for target in mqtt_decode; do
  mkdir -p "$work/$target"
  echo "fuzz: $target for ${secs}s"
  if ! cargo fuzz run "$target" "$work/$target" "corpus/$target" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 > "$work/$target.log" 2>&1; then
    tail -60 "$work/$target.log"
    echo "fuzz: $target failed (a crash input, if any, is in fuzz/artifacts/$target)"
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "$work/$target.log" || true
done
echo "fuzz: ok"
