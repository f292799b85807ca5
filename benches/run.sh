#!/usr/bin/env bash
# Runs the whole benchmark harness and rewrites BENCHMARKS.md. Installs DuckDB (PyPI) for the
# side-by-side run when it is missing.
#   benches/run.sh [--events N] [--rounds R] [--no-duckdb] [--no-http] [--no-kafka] [--no-s3] [--no-nexmark] [--no-window] [--freshness-secs S] [--out FILE] [--floor-only]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python3 -c "import duckdb" 2>/dev/null || python3 -m pip install --quiet duckdb
cargo bench --bench pipeline -- "$@"
