#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-only
#
# Compare the cohort bench's queries on DuckDB and PostgreSQL over the same Parquet files.
#
#   run_peers.sh DIR [--runs N] [--out FILE] [--engines duckdb,postgres]
#   run_peers.sh DIR --sample [--sample-persons N] [...]
#
# Sets up what it needs (idempotently), then runs run_peers.py:
#   - a virtualenv at ${PEERS_VENV:-$HOME/.cache/pre-broker-peers-venv} with requirements.txt;
#   - the PostgreSQL server package from apt (postgresql-${PEERS_PG_VERSION:-15}) if absent;
#   - a throwaway cluster in a temp directory, on 127.0.0.1 and a free port, run as
#     ${PEERS_PG_USER:-postgres} when invoked as root; stopped and removed on exit.
# --sample first writes the synthetic smoke-test data set (sample_data.py) into DIR.
# See README.md for the settings and the environment variables.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${PEERS_VENV:-$HOME/.cache/pre-broker-peers-venv}
PYTHON=${PEERS_PYTHON:-python3}
PG_VERSION=${PEERS_PG_VERSION:-15}
PG_BIN=${PEERS_PG_BIN:-/usr/lib/postgresql/$PG_VERSION/bin}
PG_USER=${PEERS_PG_USER:-postgres}

say() { echo "run_peers: $*" >&2; }
die() { say "$*"; exit 2; }
usage() { sed -n '4,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $# -ge 1 && $1 != -* ]] || usage
DIR=$1
shift
SAMPLE=0
SAMPLE_PERSONS=10000
WANT_PG=1
PASS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --sample) SAMPLE=1 ;;
        --sample-persons) [[ $# -ge 2 ]] || usage; SAMPLE_PERSONS=$2; shift ;;
        --engines)
            [[ $# -ge 2 ]] || usage
            [[ ,$2, == *,postgres,* ]] || WANT_PG=0
            PASS+=("$1" "$2"); shift ;;
        --engines=*)
            [[ ,${1#--engines=}, == *,postgres,* ]] || WANT_PG=0
            PASS+=("$1") ;;
        -h|--help) usage ;;
        *) PASS+=("$1") ;;
    esac
    shift
done
if [[ $SAMPLE == 0 ]]; then
    [[ -f $DIR/queries.sql && -f $DIR/expected.json ]] \
        || die "$DIR: no queries.sql and expected.json (give a bench output directory, or --sample)"
fi

SUDO=()
if [[ $EUID -ne 0 ]]; then
    SUDO=(sudo)
fi
apt_install() {
    # Installs Debian packages non-interactively, refreshing the package lists only if needed.
    if [[ $EUID -ne 0 ]] && ! command -v sudo >/dev/null; then
        die "need root (or sudo) to apt-get install $*"
    fi
    local apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q --no-install-recommends)
    say "apt-get install $*"
    "${apt[@]}" install "$@" >&2 || { "${apt[@]}" update >&2 && "${apt[@]}" install "$@" >&2; }
}

T_SETUP=$(now)

# ------------------------------------------------------------------ Python virtualenv
T=$(now)
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
    PYTHON=python3
fi
if [[ -e $VENV ]] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
    [[ -f $VENV/pyvenv.cfg ]] || die "$VENV exists and is not a virtualenv; set PEERS_VENV elsewhere"
    say "recreating broken virtualenv $VENV"
    rm -rf "$VENV"
fi
if [[ ! -e $VENV ]]; then
    say "creating virtualenv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
# Offline and quick when the pinned versions are already there.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt" >&2
say "virtualenv ready ($(since "$T") s)"

if [[ $SAMPLE == 1 ]]; then
    "$VENV/bin/python" "$HERE/sample_data.py" "$DIR" --persons "$SAMPLE_PERSONS"
fi

if [[ $WANT_PG == 0 ]]; then
    exec "$VENV/bin/python" "$HERE/run_peers.py" "$DIR" "${PASS[@]}"
fi

# ------------------------------------------------------------------ PostgreSQL server
T=$(now)
if [[ ! -x $PG_BIN/postgres ]]; then
    [[ -z ${PEERS_PG_BIN:-} ]] || die "PEERS_PG_BIN=$PG_BIN has no postgres binary"
    apt_install "postgresql-$PG_VERSION"
    [[ -x $PG_BIN/postgres ]] || die "postgresql-$PG_VERSION installed but $PG_BIN/postgres is missing"
    say "PostgreSQL $PG_VERSION installed ($(since "$T") s)"
else
    say "PostgreSQL server present: $("$PG_BIN/postgres" --version)"
fi

# PostgreSQL refuses to run as root: as root, run the server as $PG_USER.
AS_PG=()
if [[ $EUID -eq 0 ]]; then
    id "$PG_USER" >/dev/null 2>&1 || die "no user $PG_USER to run the server as (set PEERS_PG_USER)"
    AS_PG=(runuser -u "$PG_USER" --)
fi

T=$(now)
PG_TMP=$(mktemp -d "${PEERS_PG_TMPDIR:-/tmp}/peers-pg.XXXXXX")
STARTED=0
PY_PID=
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n $PY_PID ]] && kill -0 "$PY_PID" 2>/dev/null; then
        kill -TERM "$PY_PID" 2>/dev/null || true
        wait "$PY_PID" 2>/dev/null || true
    fi
    if [[ $STARTED == 1 ]]; then
        (cd "$PG_TMP" && "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m fast -w stop >/dev/null) \
            || say "could not stop the server in $PG_TMP"
    fi
    rm -rf "$PG_TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
chmod 700 "$PG_TMP"
[[ $EUID -ne 0 ]] || chown "$PG_USER:" "$PG_TMP"
as_pg() { (cd "$PG_TMP" && "${AS_PG[@]}" "$@"); }

# Password authentication even on loopback: other local users cannot use the cluster.
PGPASSWORD=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
export PGPASSWORD
(umask 077 && printf '%s\n' "$PGPASSWORD" >"$PG_TMP/pwfile")
[[ $EUID -ne 0 ]] || chown "$PG_USER:" "$PG_TMP/pwfile"
as_pg "$PG_BIN/initdb" -D "$PG_TMP/data" -U bench --pwfile="$PG_TMP/pwfile" --auth=scram-sha-256 \
    --encoding=UTF8 --locale=C --no-sync >"$PG_TMP/initdb.log" 2>&1 \
    || { cat "$PG_TMP/initdb.log" >&2; die "initdb failed"; }
rm -f "$PG_TMP/pwfile"

# Settings for the comparison (README.md explains them); PEERS_PG_CONF lines are appended
# last and so override them.
NCPU=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }
DSM=posix
# Parallel query needs room in /dev/shm (small in some containers): otherwise use files.
SHM_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
if [[ -z $SHM_MB ]] || ((SHM_MB < 1024)); then DSM=mmap; fi
cat >>"$PG_TMP/data/postgresql.conf" <<EOF

# ---- run_peers.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_TMP'
shared_buffers = $((MEM_MB / 4))MB
effective_cache_size = $((MEM_MB * 3 / 4))MB
work_mem = $(min 256 $((MEM_MB / 64)))MB
maintenance_work_mem = $(min 2048 $((MEM_MB / 16)))MB
max_worker_processes = $((NCPU > 8 ? NCPU : 8))
max_parallel_workers = $NCPU
max_parallel_workers_per_gather = $NCPU
max_parallel_maintenance_workers = $NCPU
random_page_cost = 1.1
effective_io_concurrency = 200
dynamic_shared_memory_type = $DSM
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
max_wal_size = 16GB
checkpoint_timeout = 1h
autovacuum = off
${PEERS_PG_CONF:-}
EOF

PORT=
for attempt in 1 2 3; do
    PORT=${PEERS_PG_PORT:-$("$VENV/bin/python" -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    if as_pg "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -o "-p $PORT" -w -t 60 start >/dev/null; then
        STARTED=1
        break
    fi
    [[ -z ${PEERS_PG_PORT:-} && $attempt -lt 3 ]] || { cat "$PG_TMP/server.log" >&2; die "the server did not start"; }
    say "server did not start on port $PORT; trying another"
done
say "throwaway cluster $PG_TMP/data up on 127.0.0.1:$PORT ($(since "$T") s)"
say "setup done in $(since "$T_SETUP") s"

# In the background and waited for, so that a signal reaches the trap at once.
"$VENV/bin/python" "$HERE/run_peers.py" "$DIR" \
    --pg-dsn "host=127.0.0.1 port=$PORT user=bench dbname=postgres" "${PASS[@]}" &
PY_PID=$!
rc=0
wait "$PY_PID" || rc=$?
PY_PID=
exit "$rc"
