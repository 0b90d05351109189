#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for switchboard's PostgreSQL tests and benchmark, from the machine's
# packages (installed with apt when missing and run as root).
#
#   eval "$(.ci/postgres.sh start)"   # starts it (or finds it running) and prints the exports
#   .ci/postgres.sh stop              # stops it; the data directory stays for the next start
#
# It listens on 127.0.0.1 only (port $SWITCHBOARD_TEST_POSTGRES_PORT, default 55432), trusts
# every local connection (-A trust: test use only, never for real data) and keeps its data and
# socket in $SWITCHBOARD_TEST_POSTGRES_DIR (default /tmp/switchboard-test-postgres). initdb
# refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail

bin=${SWITCHBOARD_TEST_POSTGRES_BIN:-/usr/lib/postgresql/15/bin}
dir=${SWITCHBOARD_TEST_POSTGRES_DIR:-/tmp/switchboard-test-postgres}
port=${SWITCHBOARD_TEST_POSTGRES_PORT:-55432}
data="$dir/data"

# Runs a command as the server's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    if [ ! -x "$bin/initdb" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing PostgreSQL 15 with apt" >&2
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >&2
        else
            echo "PostgreSQL 15 is not installed ($bin/initdb missing)" >&2
            exit 1
        fi
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$data" -A trust -U postgres --no-instructions -E UTF8 >&2
    fi
    if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=300" >&2
    fi
    echo "export SWITCHBOARD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
}

stop() {
    if [ -f "$data/PG_VERSION" ]; then
        as_owner "$bin/pg_ctl" -D "$data" -w -m fast stop >&2 || true
    fi
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 [start|stop]" >&2
        exit 2
        ;;
esac
