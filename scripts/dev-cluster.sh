#!/usr/bin/env bash
# A local spike cluster on the embedded SQLite store: a dev PKI, three Keepers and one Nexus on
# 127.0.0.1. Everything lives under ${SPIKE_DEV_DIR:-.spike-dev}; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spike-target}"
dir="${SPIKE_DEV_DIR:-$PWD/.spike-dev}"
cargo build --locked --quiet
spike="$CARGO_TARGET_DIR/debug/spike"

mkdir -p "$dir"
if [ ! -f "$dir/ca/ca.key" ]; then
  "$spike" pki init "$dir/ca"
  issue() { "$spike" pki issue "$dir/ca" --spiffe-id "spiffe://spike.ist$1" --out "$dir/$2" --dns localhost --ip 127.0.0.1; }
  issue /spike/nexus nexus
  for i in 1 2 3; do issue "/spike/keeper/$i" "keeper-$i"; done
  issue /spike/pilot/role/superuser superuser
fi

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; echo "stopped"; }
trap stop EXIT INT TERM

ports=(8443 8543 8643)
peers=""
for i in 1 2 3; do
  port=${ports[$((i-1))]}
  SPIKE_SVID_DIR="$dir/keeper-$i" SPIKE_KEEPER_TLS_PORT="127.0.0.1:$port" \
    "$spike" keeper 2>>"$dir/keeper-$i.log" &
  pids+=($!)
  peers="${peers:+$peers,}https://127.0.0.1:$port"
done
SPIKE_SVID_DIR="$dir/nexus" SPIKE_NEXUS_TLS_PORT="127.0.0.1:8553" \
  SPIKE_NEXUS_KEEPER_PEERS="$peers" SPIKE_NEXUS_DATA_DIR="$dir/data" \
  "$spike" nexus 2>>"$dir/nexus.log" &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -sf --cacert "$dir/ca/ca.pem" https://localhost:8553/health >/dev/null; then break; fi
  sleep 0.1
done
curl -s --cacert "$dir/ca/ca.pem" https://localhost:8553/health; echo
cat <<MSG

spike is running (logs in $dir/*.log). In another terminal:
  export SPIKE_NEXUS_API_URL=https://localhost:8553
  export SPIKE_SVID_DIR=$dir/superuser
  curl --cacert $dir/ca/ca.pem https://localhost:8553/health
Press Ctrl-C to stop.
MSG
wait
