#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and whole-server tests (cargo), then the
# official-SDK compatibility suite (npm + PyPI SDKs against a spawned dps on port 443 in a
# private network namespace). Installs what it needs on first run. Used by CI (.ci/run).
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
