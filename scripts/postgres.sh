#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server for tests, on 127.0.0.1 only.
#
#   scripts/postgres.sh start DIR          initdb into DIR on first use (trust auth, a free port,
#                                          unix socket in DIR), start it, create database
#                                          spike_test, and print
#                                          SPIKE_TEST_POSTGRES_URL=postgres://spike@127.0.0.1:PORT/spike_test
#                                          Starting DIR again reuses its data and its port.
#   scripts/postgres.sh stop DIR [MODE]    stop it (pg_ctl MODE: fast (default), immediate, smart)
#   scripts/postgres.sh standby DIR PRIMARY_DIR [inherit-sync]
#                                          a streaming-replication standby of the server in
#                                          PRIMARY_DIR (pg_basebackup -R over 127.0.0.1), started
#                                          on its own port; the primary is then set to
#                                          synchronous_standby_names='*' (commits wait until the
#                                          standby has them) and the script waits until the
#                                          standby is in sync. Prints the standby's URL as start
#                                          does. DIR must not exist yet. The standby itself has
#                                          no synchronous standby (once promoted it commits
#                                          alone), unless inherit-sync: then it keeps '*', as a
#                                          copy of a primary configured in postgresql.conf does,
#                                          and once promoted its commits wait for a standby that
#                                          does not exist.
#   scripts/postgres.sh promote DIR        promote the standby in DIR (pg_ctl promote, waits)
#   scripts/postgres.sh kill DIR           SIGKILL the postmaster in DIR (a crash; its backends
#                                          die when they notice)
#   scripts/postgres.sh sql DIR SQL        run SQL (one statement) as the superuser spike
#
# PostgreSQL refuses to run as root, so as root the server runs as the unprivileged user
# spike-test (created if missing); DIR and its parents must be reachable by that user. If the
# PostgreSQL 15 binaries are missing they are installed with apt-get (when root), or the script
# says what to install.
set -euo pipefail

usage() { echo "usage: $0 start DIR | stop DIR [fast|immediate|smart] | standby DIR PRIMARY_DIR | promote DIR | kill DIR | sql DIR SQL" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
mode=${3:-fast}

find_bin() {
  for d in "${SPIKE_PG_BIN:-}" /usr/lib/postgresql/15/bin; do
    if [ -n "$d" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  return 1
}

if ! bin=$(find_bin); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "postgres.sh: PostgreSQL 15 not found; installing postgresql-15 with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql-15 >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql-15 >&2; }
  fi
  bin=$(find_bin) || { echo "postgres.sh: PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin; install the postgresql-15 package (or set SPIKE_PG_BIN)" >&2; exit 1; }
fi

# Run a PostgreSQL binary as the unprivileged user when we are root.
if [ "$(id -u)" = 0 ]; then
  user=spike-test
  id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
  as_pg() { runuser -u "$user" -- "$@"; }
else
  user=$(id -un)
  as_pg() { "$@"; }
fi

# shellcheck source=ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

# Starts the server in DIR/data on DIR/port, or on a newly picked port (kept in DIR/port) when
# DIR has none. A picked port that another server took between the pick and the bind is
# replaced, up to five times; a port that clients already know (DIR/url exists) is kept.
start_server() {
  local dir=$1 data=$1/data
  for _ in 1 2 3 4 5; do
    port=$(cat "$dir/port" 2>/dev/null || pick_port)
    echo "$port" >"$dir/port"
    if as_pg "$bin/pg_ctl" -D "$data" -o "-p $port" -l "$dir/server.log" -w -t 60 start >/dev/null 2>&1; then
      return 0
    fi
    if [ -f "$dir/url" ] || ! tail -n 5 "$dir/server.log" | grep -q "could not bind"; then break; fi
    rm -f "$dir/port"
  done
  return 1
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    data="$dir/data"
    if [ "$(id -u)" = 0 ]; then
      chown "$user" "$dir"
      chmod 700 "$dir"
      if ! as_pg test -w "$dir"; then
        echo "postgres.sh: user $user cannot reach $dir (a parent directory is closed); use a directory whose parents are searchable" >&2
        exit 1
      fi
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
      as_pg "$bin/initdb" -D "$data" -U spike --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
      cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = 400
shared_buffers = 32MB
log_min_messages = warning
CONF
      # Trust only on loopback and the private socket.
      cat >"$data/pg_hba.conf" <<HBA
local all all trust
host  all all 127.0.0.1/32 trust
local replication all trust
host  replication all 127.0.0.1/32 trust
HBA
    fi
    if ! start_server "$dir"; then
      echo "postgres.sh: PostgreSQL did not start; its log:" >&2
      tail -n 30 "$dir/server.log" >&2 || true
      exit 1
    fi
    if ! as_pg "$bin/psql" -h "$dir" -p "$port" -U spike -d postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = 'spike_test'" | grep -q 1; then
      as_pg "$bin/psql" -h "$dir" -p "$port" -U spike -d postgres -qc "CREATE DATABASE spike_test" >/dev/null
    fi
    url="postgres://spike@127.0.0.1:$port/spike_test?sslmode=disable"
    echo "$url" >"$dir/url"
    echo "SPIKE_TEST_POSTGRES_URL=$url"
    ;;
  stop)
    dir=$(cd "$dir" 2>/dev/null && pwd) || exit 0
    if [ -f "$dir/data/postmaster.pid" ]; then
      as_pg "$bin/pg_ctl" -D "$dir/data" -m "$mode" -w -t 60 stop >/dev/null
    fi
    ;;
  standby)
    [ $# -ge 3 ] || usage
    primary=$(cd "$3" && pwd)
    pport=$(cat "$primary/port")
    [ ! -e "$dir/data" ] || { echo "postgres.sh: $dir/data exists; a standby is made once" >&2; exit 1; }
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    data="$dir/data"
    if [ "$(id -u)" = 0 ]; then chown "$user" "$dir"; chmod 700 "$dir"; fi
    # Servers initialised before replication was allowed on loopback.
    if ! grep -q '^host  *replication' "$primary/data/pg_hba.conf"; then
      printf 'local replication all trust\nhost  replication all 127.0.0.1/32 trust\n' >>"$primary/data/pg_hba.conf"
      as_pg "$bin/pg_ctl" -D "$primary/data" reload >/dev/null
    fi
    as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$pport" -U spike -D "$data" -R -X stream -c fast >"$dir/basebackup.log" 2>&1 \
      || { cat "$dir/basebackup.log" >&2; exit 1; }
    # The copy carries the primary's settings: give the standby its own socket, and no
    # synchronous standby of its own (after a promotion it commits alone, as Patroni's
    # non-strict synchronous mode does, instead of waiting for a standby that does not exist).
    sed -i '/^synchronous_standby_names/d' "$data/postgresql.auto.conf"
    own_sync=''
    [ "${4:-}" = inherit-sync ] && own_sync='*'
    cat >>"$data/postgresql.conf" <<CONF
unix_socket_directories = '$dir'
synchronous_standby_names = '$own_sync'
CONF
    if ! start_server "$dir"; then
      echo "postgres.sh: the standby did not start; its log:" >&2
      tail -n 30 "$dir/server.log" >&2 || true
      exit 1
    fi
    psql_primary() { as_pg "$bin/psql" -h "$primary" -p "$pport" -U spike -d postgres -Atqc "$1"; }
    psql_primary "ALTER SYSTEM SET synchronous_standby_names = '*'" >/dev/null
    psql_primary "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 1 600); do
      if [ "$(psql_primary "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'")" -ge 1 ]; then
        url="postgres://spike@127.0.0.1:$port/spike_test?sslmode=disable"
        echo "$url" >"$dir/url"
        echo "SPIKE_TEST_POSTGRES_URL=$url"
        exit 0
      fi
      sleep 0.1
    done
    echo "postgres.sh: the standby did not become a synchronous standby within 60s; its log:" >&2
    tail -n 30 "$dir/server.log" >&2 || true
    exit 1
    ;;
  promote)
    dir=$(cd "$dir" && pwd)
    as_pg "$bin/pg_ctl" -D "$dir/data" -w -t 60 promote >/dev/null
    ;;
  sql)
    [ $# -ge 3 ] || usage
    dir=$(cd "$dir" && pwd)
    as_pg "$bin/psql" -h "$dir" -p "$(cat "$dir/port")" -U spike -d spike_test -Atqc "$3"
    ;;
  kill)
    dir=$(cd "$dir" && pwd)
    pid=$(head -n 1 "$dir/data/postmaster.pid")
    kill -KILL "$pid"
    ;;
  *) usage ;;
esac
