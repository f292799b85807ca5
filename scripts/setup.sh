#!/usr/bin/env bash
# Installs what Sluice needs on a fresh machine (Rust toolchain, Python 3, gcc and make are
# assumed present).
#
#   scripts/setup.sh          what the quickstart needs (the embedded default: local disk, no
#                             external services) — nothing beyond the toolchain today
#   scripts/setup.sh --test   also what the test suite needs
#
# External services used by later tests (a Kafka-protocol broker, an S3-compatible server) are
# installed here, cached under ~/.cache/sluice-tools, when those tests exist.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required: $2" >&2; exit 1; }
}
need cargo "install Rust with rustup (https://rustup.rs)"
need python3 "install Python 3"

mkdir -p "$CARGO_TARGET_DIR"
if [[ "${1:-}" == "--test" ]]; then
  : # no external test services are needed yet
fi
echo "setup: ok (build directory: $CARGO_TARGET_DIR)"
