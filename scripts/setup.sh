#!/usr/bin/env bash
# Installs what Sluice needs on a fresh machine (Rust toolchain, Python 3, gcc and make are
# assumed present).
#
#   scripts/setup.sh          what the quickstart needs (the embedded default: local disk, no
#                             external services) — nothing beyond the toolchain today
#   scripts/setup.sh --test   also what the test suite needs
#
# What the tests need beyond the toolchain is installed here: the Parquet readers of
# tests/it/readers.rs (a Python virtualenv cached under ~/.cache/sluice-tools) and Debian's
# chromium for the HTML quality report, a Kafka-protocol broker (tansu) for the Kafka source, an
# S3-compatible server (moto) for S3 tables, and cargo-deny for the supply-chain check.
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
  # The readers the sink's output must work with (tests/it/readers.rs): Spark, DuckDB,
  # Polars and pyarrow from PyPI, in a virtualenv cached under ~/.cache/sluice-tools (Java,
  # which Spark runs on, must be on the machine).
  need java "install a Java runtime (17 or later) for Spark"
  TOOLS="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}"
  READERS="pyspark==4.3.0 duckdb==2.0.1 polars==2.1.0 pyarrow==26.0.1"
  if [[ ! -f "$TOOLS/venv/.readers" ]] || [[ "$(cat "$TOOLS/venv/.readers")" != "$READERS" ]]; then
    echo "setup: installing $READERS into $TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    # shellcheck disable=SC2086
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check $READERS
    echo "$READERS" > "$TOOLS/venv/.readers"
  fi
  # An S3-compatible server for tests/it/s3.rs: moto from PyPI, in the same virtualenv; the
  # tests start `moto_server -H 127.0.0.1 -p PORT` on random loopback ports.
  MOTO="moto[server]==5.2.5"
  if [[ ! -f "$TOOLS/venv/.moto" ]] || [[ "$(cat "$TOOLS/venv/.moto")" != "$MOTO" ]]; then
    echo "setup: installing $MOTO into $TOOLS/venv"
    [[ -x "$TOOLS/venv/bin/pip" ]] || python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "$MOTO"
    echo "$MOTO" > "$TOOLS/venv/.moto"
  fi
  # A Kafka-protocol broker for tests/it/kafka.rs: tansu from crates.io, built once (about 13
  # minutes on 2 cores) and cached as $TOOLS/tansu/bin/tansu; the tests start it on random
  # loopback ports with in-memory storage.
  TANSU_VERSION="0.6.0"
  if [[ ! -x "$TOOLS/tansu/bin/tansu" ]] || [[ "$(cat "$TOOLS/tansu/.version" 2>/dev/null)" != "$TANSU_VERSION" ]]; then
    echo "setup: building tansu $TANSU_VERSION (a Kafka-protocol broker) into $TOOLS/tansu (takes minutes)"
    # Its own target directory: the project's build cache stays the project's.
    CARGO_TARGET_DIR="$TOOLS/tansu-build" cargo install tansu --version "$TANSU_VERSION" \
      --features dynostore --locked --root "$TOOLS/tansu" --quiet
    rm -rf "$TOOLS/tansu-build"
    echo "$TANSU_VERSION" > "$TOOLS/tansu/.version"
  fi
  # cargo-deny checks licenses, bans and sources in the test command (scripts/test.sh): from
  # crates.io, built once and cached as $TOOLS/cargo-deny/bin/cargo-deny (its own build
  # directory, like tansu's).
  DENY_VERSION="0.20.2"
  if [[ ! -x "$TOOLS/cargo-deny/bin/cargo-deny" ]] || [[ "$(cat "$TOOLS/cargo-deny/.version" 2>/dev/null)" != "$DENY_VERSION" ]]; then
    echo "setup: building cargo-deny $DENY_VERSION into $TOOLS/cargo-deny (takes minutes)"
    CARGO_TARGET_DIR="$TOOLS/cargo-deny-build" cargo install cargo-deny --version "$DENY_VERSION" \
      --locked --root "$TOOLS/cargo-deny" --quiet
    rm -rf "$TOOLS/cargo-deny-build"
    echo "$DENY_VERSION" > "$TOOLS/cargo-deny/.version"
  fi
  # Headless Chromium opens the HTML quality report (tests/it/quality.rs): Debian's package.
  if ! command -v "${SLUICE_CHROMIUM:-chromium}" >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium"
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
fi
echo "setup: ok (build directory: $CARGO_TARGET_DIR)"
