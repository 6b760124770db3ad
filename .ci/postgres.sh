#!/usr/bin/env bash
# Install the PostgreSQL server binaries (initdb, pg_ctl, createdb) that tests/test_tune_storage.py
# uses to start a throwaway server. Debian only; installing needs root. The tests start and stop
# the server themselves, so this script only installs the package.
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "postgres.sh: PostgreSQL server binaries found in $(dirname /usr/lib/postgresql/*/bin/pg_ctl | tail -n 1)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "postgres.sh: PostgreSQL server binaries not found; run this script as root to install the postgresql package." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends postgresql
ls /usr/lib/postgresql/*/bin/pg_ctl
