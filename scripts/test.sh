#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end suite (tests/it), the .slt files and doctests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/setup.sh --test
# Each rebuild of a test binary leaves the old one (about 1 GB with debug info) in the shared
# build directory: keep the two newest of each, so a persistent cache does not fill the disk.
for name in it sluice; do
  { ls -t "$CARGO_TARGET_DIR"/debug/deps/"$name"-???????????????? 2>/dev/null || true; } | tail -n +3 | xargs -r rm -f
done
cargo test --workspace --locked --features sluice/fault-injection,sluice/cluster
