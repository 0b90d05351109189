# Sourced by the benchmark scripts (from the repository's root): what they share.

# Sets BIN to the release binary, built now, unless BIN names one already (before/after runs).
bench_binary() {
  if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"
  fi
}

# Starts the throwaway PostgreSQL of .ci/postgres.sh (or finds it running) and prints its
# admin URL only: the nodes refuse SWITCHBOARD_* variables they do not know.
postgres_admin_url() {
  .ci/postgres.sh start | sed -n 's/^export SWITCHBOARD_TEST_POSTGRES_URL=//p'
}
