# Sourced by the suites' run.sh: `find_dps NAME [path]` sets `dps` to the absolute path of the
# binary to test (the path given, else target/release/dps, else target/debug/dps) or exits 2.
find_dps() {
  local name="$1" root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  dps="${2:-}"
  if [ -z "$dps" ]; then
    for c in "$root/target/release/dps" "$root/target/debug/dps"; do
      [ -x "$c" ] && { dps="$c"; break; }
    done
  fi
  [ -x "$dps" ] || { echo "$name: no dps binary; build it first (cargo build -p dps-cli)"; exit 2; }
  dps="$(cd "$(dirname "$dps")" && pwd)/$(basename "$dps")"
}
