#!/usr/bin/env bash
# A kobold_api cluster on this machine's loopback: PostgreSQL (a throwaway cluster made with
# Debian's postgresql-15 binaries), N replicas sharing it and one characters folder, and HAProxy
# in front (deploy/haproxy.cfg.in: affinity by conversation, health checks on /health).
#
#   deploy/local-cluster.sh up [--replicas N] [--port P] [--model M] [--data-dir D] [--dir S] [-- SERVE ARGS...]
#   deploy/local-cluster.sh down [--dir S]
#   deploy/local-cluster.sh status [--dir S]
#
# `up` prints the proxy's URL (replicas listen on P+1..P+N, named r1..rN; each answer names its
# replica in X-Kobold-Replica) and writes S/cluster.env (PROXY_URL, REPLICA_URLS, DATABASE_URL,
# and each replica's pid file). KOBOLD_API_* variables reach every replica, e.g.
# KOBOLD_API_TURN_LEASE_SECONDS=5. Defaults: 2 replicas, port 5000, the embedded default model,
# data dir ./data (its prepared models are shared), state in ${TMPDIR:-/tmp}/kobold-cluster-$USER.
# Missing Debian packages (postgresql-15, haproxy) are installed when this runs as root or with
# passwordless sudo.
set -Eeuo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
command="${1:-}"
[ $# -gt 0 ] && shift
replicas=2
port=5000
model="default"
data_dir="$PWD/data"
state="${KOBOLD_CLUSTER_DIR:-${TMPDIR:-/tmp}/kobold-cluster-$(id -un)}"
serve_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --replicas) replicas="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --data-dir) data_dir="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
        --dir) state="$2"; shift 2 ;;
        --) shift; serve_args=("$@"); break ;;
        *) echo "local-cluster: unknown argument $1" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi

say() { echo "local-cluster: $*" >&2; }

pg_bin() {
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [ -n "$found" ] && [ -x "$found/pg_ctl" ] && echo "$found" && return 0
    command -v pg_ctl >/dev/null 2>&1 && dirname "$(command -v pg_ctl)" && return 0
    return 1
}

# PostgreSQL refuses to run as root: as root it runs as the postgres (else nobody) user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        local user=postgres
        id -u postgres >/dev/null 2>&1 || user=nobody
        runuser -u "$user" -- "$@"
    else
        "$@"
    fi
}

pg_owner() {
    if [ "$(id -u)" = 0 ]; then id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody; else id -un; fi
}

wait_healthy() {  # url seconds [pid file of the process that should answer]
    local url="$1" deadline=$((SECONDS + $2)) pidfile="${3:-}"
    while [ $SECONDS -lt $deadline ]; do
        # A process that exited (a port already in use, a bad argument) will not answer: say so now.
        if [ -n "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 1; fi
        if "$python" - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/health", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
        sleep 0.5
    done
    return 1
}

stop_pidfile() {  # file
    local file="$1" pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop_all() {  # HAProxy, the replicas, PostgreSQL; the state folder stays
    stop_pidfile "$state/haproxy.pid"
    for file in "$state"/replica-*.pid; do [ -e "$file" ] && stop_pidfile "$file"; done
    if [ -f "$state/pg/data/postmaster.pid" ] && bin="$(pg_bin)"; then
        as_pg "$bin/pg_ctl" -D "$state/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

down() {
    [ -d "$state" ] || { say "nothing to stop in $state"; return 0; }
    stop_all
    rm -rf "$state"
    say "stopped and removed $state"
}

up() {
    if [ -e "$state/cluster.env" ]; then
        say "a cluster already runs from $state (deploy/local-cluster.sh down first)"
        exit 1
    fi
    [ "$replicas" -ge 1 ] || { say "--replicas must be at least 1"; exit 2; }
    rm -rf "$state"  # what a failed start-up left for reading
    if ! pg_bin >/dev/null || ! command -v haproxy >/dev/null 2>&1; then
        "$repo/scripts/install-system-packages.sh" postgresql-15 haproxy \
            || { say "needs PostgreSQL's server binaries and HAProxy"; exit 3; }
    fi
    local bin
    bin="$(pg_bin)" || { say "no pg_ctl found"; exit 3; }
    command -v haproxy >/dev/null 2>&1 || { say "no haproxy found"; exit 3; }
    mkdir -p "$state/pg" "$state/characters"
    trap 'say "start-up failed; logs are in $state"; down_on_failure' ERR

    say "PostgreSQL: initdb and start in $state/pg"
    chown "$(pg_owner)" "$state/pg"
    chmod 700 "$state/pg"
    as_pg "$bin/initdb" -D "$state/pg/data" -A trust -U kobold -E UTF8 >"$state/pg/initdb.log" 2>&1
    as_pg "$bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/postgres.log" -w start \
        -o "-k $state/pg -h '' -c max_connections=200 -c idle_in_transaction_session_timeout=60s" >/dev/null
    local database_url="postgresql+psycopg2://kobold@/postgres?host=$state/pg"

    say "preparing the model once ($model)"
    "$python" -m kobold_api prepare "$model" --data-dir "$data_dir" >"$state/prepare.log" 2>&1

    local urls=() servers="" i replica_port
    for i in $(seq 1 "$replicas"); do
        replica_port=$((port + i))
        KOBOLD_API_CHARACTERS_DIR="$state/characters" nohup "$python" -m kobold_api serve \
            --host 127.0.0.1 --port "$replica_port" --ws-port 0 --model "$model" --data-dir "$data_dir" \
            --database-url "$database_url" --replica-name "r$i" "${serve_args[@]}" \
            >"$state/replica-$i.log" 2>&1 &
        echo $! >"$state/replica-$i.pid"
        urls+=("http://127.0.0.1:$replica_port")
        servers+="    server r$i 127.0.0.1:$replica_port check"$'\n'
    done
    for i in $(seq 1 "$replicas"); do
        wait_healthy "${urls[$((i - 1))]}" 300 "$state/replica-$i.pid" \
            || { say "replica r$i did not become healthy (see replica-$i.log)"; false; }
    done

    python3 - "$here/haproxy.cfg.in" "$state/haproxy.cfg" "127.0.0.1:$port" "$state" "$servers" <<'PY'
import sys
template, target, bind, state, servers = sys.argv[1:]
text = open(template).read().replace("@PROXY_BIND@", bind).replace("@STATE_DIR@", state)
open(target, "w").write(text.replace("@SERVERS@", servers.rstrip("\n")))
PY
    haproxy -c -q -f "$state/haproxy.cfg"
    nohup haproxy -db -f "$state/haproxy.cfg" >"$state/haproxy.log" 2>&1 &
    echo $! >"$state/haproxy.pid"
    wait_healthy "http://127.0.0.1:$port" 30 "$state/haproxy.pid" || { say "HAProxy does not answer (see haproxy.log)"; false; }
    trap - ERR

    {
        echo "PROXY_URL=http://127.0.0.1:$port"
        echo "REPLICA_URLS=\"${urls[*]}\""
        echo "DATABASE_URL=$database_url"
        echo "STATE_DIR=$state"
    } >"$state/cluster.env"
    for i in $(seq 1 "$replicas"); do say "replica r$i: ${urls[$((i - 1))]} (pid $(cat "$state/replica-$i.pid"))"; done
    say "database: $database_url"
    say "logs and pid files: $state; stop with: deploy/local-cluster.sh down --dir $state"
    echo "http://127.0.0.1:$port"
}

down_on_failure() {  # the logs stay for reading; the next `up` clears them
    trap - ERR
    stop_all
    exit 1
}

case "$command" in
    up) up ;;
    down) down ;;
    status)
        [ -f "$state/cluster.env" ] || { say "no cluster in $state"; exit 1; }
        cat "$state/cluster.env" ;;
    *) echo "usage: $0 up [--replicas N] [--port P] [--model M] [--data-dir D] [--dir S] [-- SERVE ARGS] | down [--dir S] | status [--dir S]" >&2
       exit 2 ;;
esac
