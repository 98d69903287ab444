#!/usr/bin/env bash
# Builds dps and dps-bench (release), starts dps with a fresh data directory on loopback
# ports, holds N MQTT device connections open through dps-bench, registers through some of
# them, and prints the figures (see BENCHMARKS.md). Usage: scripts/bench-mqtt-hold.sh [N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-10000}"
cargo build --release --locked -p dps-cli -p dps-bench --manifest-path "$root/Cargo.toml" >&2
work="$(mktemp -d)"
printf 'data_dir = "%s/data"\nlog = "warn"\n[listen]\nhttps = "127.0.0.1:0"\nmqtt = "127.0.0.1:0"\namqp = "127.0.0.1:0"\n[mqtt]\nmax_connections_per_address = 1000000\n[amqp]\nenabled = false\n' "$work" > "$work/dps.toml"
"$root/target/release/dps" serve --config "$work/dps.toml" > "$work/dps.out" 2> "$work/dps.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  [ -f "$work/data/dev-credentials.json" ] && break
  sleep 0.1
done
nproc | xargs printf 'machine: %s cores, '
grep MemTotal /proc/meminfo | awk '{printf "%d GiB RAM\n", $2/1048576}'
"$root/target/release/dps-bench" mqtt-hold --credentials "$work/data/dev-credentials.json" --connections "$n"
