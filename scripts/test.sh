#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end suite (tests/it), the .slt files and doctests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/setup.sh --test
cargo test --workspace --locked --features sluice/fault-injection
