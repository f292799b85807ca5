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
# One build directory shared by several checkouts (a CI clone, the working copy): cargo keys the
# workspace crates by their path inside the workspace and judges them fresh by mtime, so after
# building another checkout it would reuse test binaries with that checkout's paths baked in
# (CARGO_BIN_EXE_sluice, CARGO_MANIFEST_DIR). Rebuild the workspace crates when the checkout
# changed.
STAMP="$CARGO_TARGET_DIR/.sluice-checkout"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$PWD" ]]; then
  find src engine connectors sql tests benches -name '*.rs' -exec touch {} +
  echo "$PWD" > "$STAMP"
fi
# Supply chain: licenses, banned crates and sources of every dependency (deny.toml). The
# advisory database cannot be fetched here: `cargo deny check advisories` is a manual step
# (README, "Security").
"${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}/cargo-deny/bin/cargo-deny" check licenses bans sources
cargo test --workspace --locked --features sluice/fault-injection,sluice/cluster
