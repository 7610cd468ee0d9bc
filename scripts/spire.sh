#!/usr/bin/env bash
# A real SPIRE server and agent (v1.13.3) on 127.0.0.1 for tests, as SPIKE's peers in production.
#
#   eval "$(scripts/spire.sh start DIR [--trust-domain TD])"   # build if needed, start, print exports
#   scripts/spire.sh stop DIR                                  # kill both; idempotent
#   scripts/spire.sh entry DIR create UID SPIFFE_ID [FLAGS]    # prints the new entry's ID
#   scripts/spire.sh entry DIR delete ENTRY_ID|uid:N|SPIFFE_ID # deletes every matching entry
#   scripts/spire.sh entry DIR show [FLAGS]                    # spire-server entry show
#   scripts/spire.sh as DIR NAME|UID CMD [ARGS...]             # run CMD as that workload
#   scripts/spire.sh fetch DIR NAME|UID                        # its X.509 SVID, as the agent serves it
#
# The binaries are built from the Go module tests/go/spire (go.mod/go.sum pin SPIRE as tools)
# into ${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}/spire-v1.13.3/bin, once: the build is
# skipped while go.mod, go.sum and the build flags hash to the stamp written beside the
# binaries. A cold build takes minutes; Go >= 1.26 must be on PATH.
#
# How workloads are told apart. Every SPIKE process in the tests is the same `spike` binary run
# by the same root user, so the unix workload attestor's path and sha256 selectors cannot tell
# a Nexus from a Keeper. The selectors are uids instead: each identity has a dedicated numeric
# uid (no user needs to exist) and runs under
#     setpriv --reuid UID --regid UID --clear-groups --inh-caps +dac_override --ambient-caps +dac_override
# The agent reads the caller's uid from the socket's peer credentials (SO_PEERCRED), which the
# kernel fills in and a workload cannot forge. The ambient CAP_DAC_OVERRIDE keeps file access as
# it is for root (the tests' temporary directories are 0700 root, cargo's binaries live under
# /root), so nothing else in a test changes; only the uid, which is the identity. Copies of the
# binary at distinct paths (discover_workload_path) would work too, but every binary a test runs
# as an identity (spike, spire-agent) would need a copy and an entry of its own, and a copy
# replaced while a process runs it breaks the path selector.
#
# The registered identities (DIR/identities: NAME UID SPIFFE_ID), parent spiffe://TD/spire-agent:
#   nexus      47001  /spike/nexus
#   keeper-1   47011  /spike/keeper     SPIKE gives every Keeper the same ID: three entries,
#   keeper-2   47012  /spike/keeper     one per uid, so one Keeper's entry can be deleted alone
#   keeper-3   47013  /spike/keeper
#   superuser  47021  /spike/pilot/role/superuser
#   recover    47022  /spike/pilot/role/recover
#   restore    47023  /spike/pilot/role/restore
#   app-one    47031  /app/one
#   app-two    47032  /app/two
#   unregistered 47099  (no entry: the agent serves it nothing)
# These entries are shared by every test: a test that deletes or changes entries creates its
# own on a uid of its own (47100-47999, see tests/common/spire.rs).
#
# The exports (for TD spike.ist; for any other trust domain the names read SPIKE_TEST_SPIRE_OTHER_
# instead of SPIKE_TEST_SPIRE_, and SPIKE_TEST_SPIRE_OTHER_SPIFFE_ENDPOINT_SOCKET):
#   SPIKE_TEST_SPIRE_DIR, SPIKE_TEST_SPIRE_TRUST_DOMAIN, SPIKE_TEST_SPIFFE_ENDPOINT_SOCKET
#   (unix://DIR/agent/api.sock), SPIKE_TEST_SPIRE_SERVER_SOCKET, SPIKE_TEST_SPIRE_SERVER_BIN,
#   SPIKE_TEST_SPIRE_AGENT_BIN.
# SPIKE_TEST_SPIRE_SVID_TTL (default 1h) is the server's default X.509 SVID TTL; one entry can
# have its own (`entry DIR create UID ID -x509SVIDTTL 60`). The agent syncs entries every second,
# so an entry created or deleted reaches workloads within about two seconds.
#
# Starting a running DIR again only prints its exports; starting a stopped DIR restarts the
# same server (port if still free, CA, entries) and a new agent (attested with a new token).
set -euo pipefail

SPIRE_VERSION=1.13.3
DEFAULT_TD=spike.ist
here="$(cd "$(dirname "$0")" && pwd)"
gomod="$here/../tests/go/spire"
tools="${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}"
prefix="$tools/spire-v$SPIRE_VERSION"
bindir="$prefix/bin"
server_bin="$bindir/spire-server"
agent_bin="$bindir/spire-agent"
ldflags="-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=$SPIRE_VERSION"

IDENTITIES="nexus 47001 /spike/nexus
keeper-1 47011 /spike/keeper
keeper-2 47012 /spike/keeper
keeper-3 47013 /spike/keeper
superuser 47021 /spike/pilot/role/superuser
recover 47022 /spike/pilot/role/recover
restore 47023 /spike/pilot/role/restore
app-one 47031 /app/one
app-two 47032 /app/two
unregistered 47099 -"

usage() {
  cat >&2 <<EOF
usage: $0 start DIR [--trust-domain TD] | stop DIR | build
       $0 entry DIR create UID SPIFFE_ID|/PATH [spire-server entry create flags]
       $0 entry DIR delete ENTRY_ID|uid:N|SPIFFE_ID|/PATH
       $0 entry DIR show [spire-server entry show flags]
       $0 as DIR NAME|UID CMD [ARGS...]
       $0 fetch DIR NAME|UID
EOF
  exit 2
}

log() { echo "spire.sh: $*" >&2; }
die() { log "$*"; exit 1; }

need_setpriv() {
  command -v setpriv >/dev/null && return
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    log "setpriv not found; installing util-linux with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q util-linux >&2 || { apt-get update -q >&2 && apt-get install -y -q util-linux >&2; }
  fi
  command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to run workloads under their uids"
}

build() {
  local want
  want="$( (cat "$gomod/go.mod" "$gomod/go.sum"; echo "$ldflags") | sha256sum | cut -d' ' -f1)"
  if [[ -x "$server_bin" && -x "$agent_bin" && "$(cat "$prefix/.stamp" 2>/dev/null)" == "$want" ]]; then
    return
  fi
  mkdir -p "$prefix"
  # One build at a time; whoever waited finds the stamp written.
  exec 8>"$prefix/.lock"
  flock 8
  if [[ -x "$server_bin" && -x "$agent_bin" && "$(cat "$prefix/.stamp" 2>/dev/null)" == "$want" ]]; then
    exec 8>&-
    return
  fi
  command -v go >/dev/null || die "go (>= 1.26) is needed to build SPIRE v$SPIRE_VERSION; put it on PATH"
  grep -q "github.com/spiffe/spire v$SPIRE_VERSION" "$gomod/go.mod" \
    || die "$gomod/go.mod does not pin github.com/spiffe/spire v$SPIRE_VERSION"
  log "building SPIRE v$SPIRE_VERSION into $bindir (a cold build takes several minutes)"
  local start=$SECONDS
  rm -f "$prefix/.stamp"
  rm -rf "$prefix/bin.new"
  # -mod=readonly: go.sum must already hold every hash, so the build is the pinned one.
  (cd "$gomod" && GOBIN="$prefix/bin.new" GOFLAGS="${GOFLAGS:-} -mod=readonly" \
    go install -trimpath -ldflags "$ldflags" tool) >&2
  rm -rf "$bindir"
  mv "$prefix/bin.new" "$bindir"
  echo "$want" >"$prefix/.stamp"
  log "built SPIRE v$SPIRE_VERSION in $((SECONDS - start))s"
  exec 8>&-
}

# The uid of identity NAME (or a number given as is) from DIR/identities.
uid_of() {
  local dir="$1" who="$2"
  if [[ "$who" =~ ^[0-9]+$ ]]; then echo "$who"; return; fi
  awk -v n="$who" '$1 == n { print $2; found = 1 } END { exit !found }' "$dir/identities" \
    || die "no identity named $who in $dir/identities"
}

as_uid() {
  local uid="$1"
  shift
  setpriv --reuid "$uid" --regid "$uid" --clear-groups \
    --inh-caps +dac_override --ambient-caps +dac_override "$@"
}

# shellcheck source=ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

# True if the pid in FILE is alive and was started with config CONF (a recycled pid is not
# ours; the config path, unlike the binary's, survives a rebuild of the binaries).
running() {
  local file="$1" conf="$2" pid
  [[ -f "$file" ]] || return 1
  pid="$(cat "$file")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$conf"
}

# Polls CMD until it succeeds; fails after SECS or as soon as the process in PIDFILE is gone.
wait_for() {
  local what="$1" secs="$2" pidfile="$3" logfile="$4" conf="$5"
  shift 5
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ! running "$pidfile" "$conf"; then
      log "$what exited; its log:"
      tail -n 30 "$logfile" >&2 || true
      return 1
    fi
    if ((SECONDS > deadline)); then
      log "$what not ready after ${secs}s; its log:"
      tail -n 30 "$logfile" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

env_lines() {
  local dir="$1" td p
  td="$(cat "$dir/trust_domain")"
  if [[ "$td" == "$DEFAULT_TD" ]]; then p=SPIKE_TEST_SPIRE_; else p=SPIKE_TEST_SPIRE_OTHER_; fi
  local sock_var=SPIKE_TEST_SPIFFE_ENDPOINT_SOCKET
  [[ "$td" == "$DEFAULT_TD" ]] || sock_var=SPIKE_TEST_SPIRE_OTHER_SPIFFE_ENDPOINT_SOCKET
  cat <<EOF
export ${p}DIR=$dir
export ${p}TRUST_DOMAIN=$td
export $sock_var=unix://$dir/agent/api.sock
export ${p}SERVER_SOCKET=$dir/server/api.sock
export SPIKE_TEST_SPIRE_SERVER_BIN=$server_bin
export SPIKE_TEST_SPIRE_AGENT_BIN=$agent_bin
EOF
}

write_configs() {
  local dir="$1" td="$2" port="$3" ttl="$4"
  cat >"$dir/server/server.conf" <<EOF
server {
  bind_address = "127.0.0.1"
  bind_port = $port
  socket_path = "$dir/server/api.sock"
  trust_domain = "$td"
  data_dir = "$dir/server/data"
  log_level = "INFO"
  ca_key_type = "ec-p256"
  ca_ttl = "168h"
  default_x509_svid_ttl = "$ttl"
  ca_subject {
    country = ["US"]
    organization = ["SPIKE tests"]
    common_name = ""
  }
  experimental {
    # Entries reach the agents within a second, not five.
    cache_reload_interval = "1s"
  }
}

plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "$dir/server/data/datastore.sqlite3"
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data {
      keys_path = "$dir/server/data/keys.json"
    }
  }
}
EOF
  cat >"$dir/agent/agent.conf" <<EOF
agent {
  data_dir = "$dir/agent/data"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = $port
  socket_path = "$dir/agent/api.sock"
  trust_bundle_path = "$dir/bundle.pem"
  trust_domain = "$td"
  join_token_file = "$dir/agent/join_token"
  workload_x509_svid_key_type = "ec-p256"
  experimental {
    sync_interval = "1s"
  }
}

plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data {
      directory = "$dir/agent/data"
    }
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }
}
EOF
}

server() {
  local dir="$1"
  shift
  "$server_bin" "$@" -socketPath "$dir/server/api.sock"
}

start_server() {
  local dir="$1" td="$2" ttl="$3" tries port
  for tries in 1 2 3 4 5; do
    port="$(cat "$dir/port" 2>/dev/null || pick_port)"
    echo "$port" >"$dir/port"
    write_configs "$dir" "$td" "$port" "$ttl"
    "$server_bin" run -config "$dir/server/server.conf" >>"$dir/server.log" 2>&1 &
    echo $! >"$dir/server.pid"
    if wait_for "spire-server" 60 "$dir/server.pid" "$dir/server.log" "$dir/server/server.conf" \
      server "$dir" healthcheck; then
      return 0
    fi
    kill -9 "$(cat "$dir/server.pid")" 2>/dev/null || true
    # The port was taken between the check and the bind: pick another.
    tail -n 20 "$dir/server.log" | grep -q "address already in use" || break
    rm -f "$dir/port"
    log "port $port was taken; trying another ($tries)"
  done
  die "spire-server did not start (log: $dir/server.log)"
}

start() {
  local dir="$1" td="$2"
  local ttl="${SPIKE_TEST_SPIRE_SVID_TTL:-1h}"
  [[ "$td" =~ ^[a-z0-9._-]+$ ]] || die "bad trust domain: $td"
  need_setpriv
  build
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [[ -f "$dir/trust_domain" && "$(cat "$dir/trust_domain")" != "$td" ]]; then
    die "$dir already holds trust domain $(cat "$dir/trust_domain")"
  fi
  # Workloads run under their own uids and must reach the agent's socket.
  chmod 755 "$dir"
  mkdir -p "$dir/server/data" "$dir/agent/data"
  chmod 700 "$dir/server" "$dir/server/data" "$dir/agent/data"
  chmod 755 "$dir/agent"
  echo "$td" >"$dir/trust_domain"
  if [[ ! -f "$dir/identities" ]]; then
    awk -v td="$td" '{ print $1, $2, ($3 == "-" ? "-" : "spiffe://" td $3) }' <<<"$IDENTITIES" >"$dir/identities"
  fi
  if running "$dir/server.pid" "$dir/server/server.conf" && running "$dir/agent.pid" "$dir/agent/agent.conf"; then
    log "already running in $dir"
    env_lines "$dir"
    return
  fi
  stop "$dir"

  start_server "$dir" "$td" "$ttl"
  server "$dir" bundle show >"$dir/bundle.pem.new"
  mv "$dir/bundle.pem.new" "$dir/bundle.pem"

  local parent="spiffe://$td/spire-agent"
  if [[ ! -f "$dir/entries.done" ]]; then
    local json sep=""
    json='{"entries":['
    while read -r _ uid id; do
      [[ "$id" == "-" ]] && continue
      json+="$sep{\"spiffe_id\":\"$id\",\"parent_id\":\"$parent\",\"selectors\":[{\"type\":\"unix\",\"value\":\"uid:$uid\"}]}"
      sep=,
    done <"$dir/identities"
    json+=']}'
    server "$dir" entry create -data - <<<"$json" >"$dir/entries.log" 2>&1 \
      || { cat "$dir/entries.log" >&2; die "could not create the registration entries"; }
    touch "$dir/entries.done"
  fi

  # The agent attests afresh on every start, with a one-use join token (kept in a 0600 file
  # until used, never printed): an agent SVID kept from an earlier run may have expired while
  # the agent was stopped. Its node alias spiffe://TD/spire-agent is every entry's parent, so
  # the entries apply to each new agent ID.
  rm -rf "$dir/agent/data"
  mkdir -m 700 "$dir/agent/data"
  local out
  out="$(server "$dir" token generate -spiffeID "$parent" -ttl 600)"
  (umask 077 && echo "${out#Token: }" >"$dir/agent/join_token")
  "$agent_bin" run -config "$dir/agent/agent.conf" >>"$dir/agent.log" 2>&1 &
  echo $! >"$dir/agent.pid"
  wait_for "spire-agent" 60 "$dir/agent.pid" "$dir/agent.log" "$dir/agent/agent.conf" \
    "$agent_bin" healthcheck -socketPath "$dir/agent/api.sock" \
    || { stop "$dir"; die "spire-agent did not start (log: $dir/agent.log)"; }
  rm -f "$dir/agent/join_token"
  # Ready means serving: wait until the Nexus identity gets its SVID.
  wait_for "the agent's SVID for nexus" 30 "$dir/agent.pid" "$dir/agent.log" "$dir/agent/agent.conf" \
    fetch "$dir" nexus \
    || { stop "$dir"; die "the agent serves no SVID (logs: $dir/server.log, $dir/agent.log)"; }
  log "SPIRE $td: server on 127.0.0.1:$(cat "$dir/port") (pid $(cat "$dir/server.pid")), agent socket $dir/agent/api.sock (pid $(cat "$dir/agent.pid"))"
  env_lines "$dir"
}

# SIGTERM to both at once (each takes about two seconds to shut down cleanly), SIGKILL to
# whichever is still there five seconds later.
stop() {
  local dir="$1" pids=() f
  dir="$(cd "$dir" 2>/dev/null && pwd)" || return 0
  for f in agent/agent server/server; do
    if running "$dir/${f%/*}.pid" "$dir/$f.conf"; then
      pids+=("$(cat "$dir/${f%/*}.pid")")
    fi
  done
  if [[ ${#pids[@]} -gt 0 ]]; then
    kill "${pids[@]}" 2>/dev/null || true
    local p alive
    for _ in $(seq 50); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [[ $alive == 1 ]] || break
      sleep 0.1
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  fi
  rm -f "$dir/agent.pid" "$dir/server.pid"
}

entry() {
  local dir="$1" op="${2:-}"
  [[ -f "$dir/trust_domain" ]] || die "no SPIRE in $dir"
  local td
  td="$(cat "$dir/trust_domain")"
  full_id() { if [[ "$1" == /* ]]; then echo "spiffe://$td$1"; else echo "$1"; fi; }
  case "$op" in
    create)
      [[ $# -ge 4 ]] || usage
      local uid id out
      uid="$(uid_of "$dir" "$3")"
      id="$(full_id "$4")"
      shift 4
      out="$(server "$dir" entry create -parentID "spiffe://$td/spire-agent" -spiffeID "$id" \
        -selector "unix:uid:$uid" "$@")" || { echo "$out" >&2; die "entry create failed"; }
      awk -F': *' '/^Entry ID/ { print $2; exit }' <<<"$out"
      ;;
    delete)
      [[ $# -eq 3 ]] || usage
      local what="$3" ids
      case "$what" in
        uid:*) ids="$(server "$dir" entry show -selector "unix:$what" | awk -F': *' '/^Entry ID/ { print $2 }')" ;;
        spiffe://* | /*) ids="$(server "$dir" entry show -spiffeID "$(full_id "$what")" | awk -F': *' '/^Entry ID/ { print $2 }')" ;;
        *) ids="$what" ;;
      esac
      [[ -n "$ids" ]] || die "no entry matches $what"
      local e
      for e in $ids; do server "$dir" entry delete -entryID "$e" >/dev/null; done
      ;;
    show)
      shift 2
      server "$dir" entry show "$@"
      ;;
    *) usage ;;
  esac
}

fetch() {
  local dir="$1" uid
  uid="$(uid_of "$dir" "$2")"
  as_uid "$uid" "$agent_bin" api fetch x509 -socketPath "$dir/agent/api.sock"
}

if [[ $# -eq 1 && "$1" == build ]]; then build; exit 0; fi
[[ $# -ge 2 ]] || usage
cmd="$1"
dir="$2"
case "$cmd" in
  start)
    td="$DEFAULT_TD"
    if [[ $# -eq 4 && "$3" == "--trust-domain" ]]; then td="$4"; elif [[ $# -ne 2 ]]; then usage; fi
    start "$dir" "$td"
    ;;
  stop) [[ $# -eq 2 ]] || usage; stop "$dir" ;;
  entry) shift; entry "$@" ;;
  as)
    [[ $# -ge 4 ]] || usage
    need_setpriv
    uid="$(uid_of "$dir" "$3")"
    shift 3
    SPIFFE_ENDPOINT_SOCKET="unix://$(cd "$dir" && pwd)/agent/api.sock" as_uid "$uid" "$@"
    ;;
  fetch) [[ $# -eq 3 ]] || usage; need_setpriv; fetch "$dir" "$3" ;;
  *) usage ;;
esac
