#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and whole-server tests (cargo), the
# official-SDK compatibility suite (npm + PyPI SDKs against a spawned dps on ports 443 and 8883
# in a private network namespace), and a bounded run of every fuzz target
# (DPS_FUZZ_SECS seconds each, default 20; 0 skips it). Installs what it needs on first run. Used by CI
# (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need ip || missing+=(iproute2)
need unshare || missing+=(util-linux)
need node || missing+=(nodejs)
need npm || missing+=(npm)
need python3 || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== official SDK compatibility suite"
bash tests/compat/run.sh target/debug/dps
fuzz_secs="${DPS_FUZZ_SECS:-20}"
if [ "$fuzz_secs" != 0 ]; then
  echo "== fuzz (${fuzz_secs}s per target)"
  bash scripts/fuzz.sh "$fuzz_secs"
fi
