#!/usr/bin/env bash
# SeaweedFS (Apache-2.0) on 127.0.0.1 for tests: a real distributed object store with an S3
# gateway, the second S3 server spike's store and HA suites run against (moto is the first).
#
#   eval "$(scripts/seaweedfs.sh start DIR)"   # builds weed if needed, starts, prints the exports
#   scripts/seaweedfs.sh stop DIR              # idempotent
#   scripts/seaweedfs.sh build                 # only build weed (./test runs it in the background)
#
# One `weed server` process runs a master, a volume server, a filer and the S3 gateway, every
# port on 127.0.0.1 picked free on first start and kept in DIR/ports, so starting again on the
# same DIR serves the same objects at the same address. S3 needs signed requests: the identity in
# DIR/s3.json has the access key and secret exported below. Telemetry is off (no outside network).
#
# The exports: SPIKE_TEST_S3_SEAWEEDFS_ENDPOINT, _BUCKET, _REGION, _ACCESS_KEY_ID,
# _SECRET_ACCESS_KEY (tests/common/s3.rs reads them), and SPIKE_TEST_S3_SEAWEEDFS_VERSION.
#
# The binary is built from the Go module tests/go/seaweedfs (go.mod/go.sum pin SeaweedFS as a
# tool) into ${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}/seaweedfs-VERSION/weed, once: the build
# is skipped while go.mod, go.sum and the build flags hash to the stamp written beside it. A cold
# build takes several minutes on two cores; Go >= 1.26 must be on PATH.
set -euo pipefail

# The pseudo-version the module proxy serves (SeaweedFS tags are not Go module versions).
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
BUCKET=spike-test
ACCESS_KEY=spike-test
SECRET_KEY=spike-test-secret
here="$(cd "$(dirname "$0")" && pwd)"
gomod="$here/../tests/go/seaweedfs"
tools="${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}"
prefix="$tools/seaweedfs-$SEAWEEDFS_VERSION"
weed="$prefix/weed"
ldflags="-s -w"

usage() {
  echo "usage: $0 start DIR | stop DIR | build" >&2
  exit 2
}

log() { echo "seaweedfs.sh: $*" >&2; }
die() { log "$*"; exit 1; }

build() {
  local want
  want="$( (cat "$gomod/go.mod" "$gomod/go.sum"; echo "$ldflags") | sha256sum | cut -d' ' -f1)"
  if [[ -x "$weed" && "$(cat "$prefix/.stamp" 2>/dev/null)" == "$want" ]]; then
    return
  fi
  mkdir -p "$prefix"
  # One build at a time; whoever waited finds the stamp written.
  exec 8>"$prefix/.lock"
  flock 8
  if [[ -x "$weed" && "$(cat "$prefix/.stamp" 2>/dev/null)" == "$want" ]]; then
    exec 8>&-
    return
  fi
  command -v go >/dev/null || die "go (>= 1.26) is needed to build SeaweedFS; put it on PATH"
  grep -q "github.com/seaweedfs/seaweedfs $SEAWEEDFS_VERSION" "$gomod/go.mod" \
    || die "$gomod/go.mod does not pin github.com/seaweedfs/seaweedfs $SEAWEEDFS_VERSION"
  log "building SeaweedFS $SEAWEEDFS_VERSION into $prefix (a cold build takes several minutes)"
  local start=$SECONDS
  rm -f "$prefix/.stamp"
  rm -rf "$prefix/bin.new"
  # -mod=readonly: go.sum must already hold every hash, so the build is the pinned one.
  (cd "$gomod" && GOBIN="$prefix/bin.new" GOFLAGS="${GOFLAGS:-} -mod=readonly" \
    go install -trimpath -ldflags "$ldflags" tool) >&2
  mv "$prefix/bin.new/weed" "$weed"
  rm -rf "$prefix/bin.new"
  echo "$want" >"$prefix/.stamp"
  log "built SeaweedFS $SEAWEEDFS_VERSION in $((SECONDS - start))s"
  exec 8>&-
}

# shellcheck source=ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

# True if the pid in DIR/pid is alive and serves DIR (a recycled pid is not ours).
running() {
  local dir="$1" pid
  [[ -f "$dir/pid" ]] || return 1
  pid="$(cat "$dir/pid")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "-dir=$dir/data"
}

# Any HTTP answer from PORT (S3 without a signature answers 403: it is up).
answers() {
  python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1)
except urllib.error.HTTPError:
    pass
EOF
}

# Writes a small file through the filer, outside the buckets: the master has volumes and the
# volume server takes writes. After a restart the master refuses volume assignments for 15 s
# (its warm-up: three heartbeat intervals for volume servers to report), so a restart is ready
# about 16 s after it began.
filer_write() {
  python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/spike-ready/ping", data=b"ok", method="PUT")
urllib.request.urlopen(req, timeout=2)
EOF
}

# The bucket, created through the cluster's own shell (an existing one stays: "already
# exists"). MASTER is host:port.grpcPort, SeaweedFS's form for a gRPC port that is not port+10000.
make_bucket() {
  local master="$1"
  echo "s3.bucket.create -name $BUCKET" | timeout 30 "$weed" shell -master="$master" >/dev/null 2>&1 || true
  echo "s3.bucket.list" | timeout 30 "$weed" shell -master="$master" 2>/dev/null | grep -qw "$BUCKET"
}

wait_until() {
  local what="$1" secs="$2" dir="$3"
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ! running "$dir"; then
      log "weed exited while waiting for $what; its log:"
      tail -n 40 "$dir/log" >&2 || true
      return 1
    fi
    if ((SECONDS > deadline)); then
      log "$what not ready after ${secs}s; its log:"
      tail -n 40 "$dir/log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

env_lines() {
  local dir="$1"
  # shellcheck disable=SC1091
  source "$dir/ports"
  cat <<EOF
export SPIKE_TEST_S3_SEAWEEDFS_ENDPOINT=http://127.0.0.1:$s3
export SPIKE_TEST_S3_SEAWEEDFS_BUCKET=$BUCKET
export SPIKE_TEST_S3_SEAWEEDFS_REGION=us-east-1
export SPIKE_TEST_S3_SEAWEEDFS_ACCESS_KEY_ID=$ACCESS_KEY
export SPIKE_TEST_S3_SEAWEEDFS_SECRET_ACCESS_KEY=$SECRET_KEY
export SPIKE_TEST_S3_SEAWEEDFS_VERSION=$SEAWEEDFS_VERSION
EOF
}

start() {
  local dir="$1"
  build
  mkdir -p "$dir/data"
  dir="$(cd "$dir" && pwd)"
  if running "$dir"; then
    log "already running in $dir"
    env_lines "$dir"
    return
  fi
  stop "$dir"
  if [[ ! -f "$dir/ports" ]]; then
    local name port picked=" "
    for name in master master_grpc volume volume_grpc filer filer_grpc s3 s3_grpc; do
      # Nothing listens on a picked port yet: draw again until it differs from the others.
      port=$(pick_port)
      while [[ "$picked" == *" $port "* ]]; do port=$(pick_port); done
      picked+="$port "
      echo "$name=$port"
    done >"$dir/ports.new"
    mv "$dir/ports.new" "$dir/ports"
  fi
  # shellcheck disable=SC1091
  source "$dir/ports"
  (umask 077 && cat >"$dir/s3.json" <<EOF
{
  "identities": [
    {
      "name": "spike-test",
      "credentials": [{ "accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY" }],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
  )
  # Small volumes: the tests write kilobytes, and the volume server stays small on disk.
  "$weed" server -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$master" -master.port.grpc="$master_grpc" -master.telemetry=false \
    -master.volumeSizeLimitMB=64 -master.electionTimeout=1s -volume.max=16 \
    -volume.port="$volume" -volume.port.grpc="$volume_grpc" -volume.preStopSeconds=0 \
    -filer -filer.port="$filer" -filer.port.grpc="$filer_grpc" \
    -filer.localSocket="$dir/filer.sock" \
    -s3 -s3.port="$s3" -s3.port.grpc="$s3_grpc" -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.config="$dir/s3.json" -s3.localSocket="$dir/s3.sock" \
    >>"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until "the filer (a write through it)" 120 "$dir" filer_write "$filer" \
    || { stop "$dir"; die "SeaweedFS did not start (log: $dir/log)"; }
  wait_until "bucket $BUCKET" 60 "$dir" make_bucket "127.0.0.1:$master.$master_grpc" \
    || { stop "$dir"; die "could not create bucket $BUCKET (log: $dir/log)"; }
  wait_until "the S3 gateway" 60 "$dir" answers "$s3" \
    || { stop "$dir"; die "the S3 gateway did not answer (log: $dir/log)"; }
  log "SeaweedFS $SEAWEEDFS_VERSION: S3 on 127.0.0.1:$s3 (pid $(cat "$dir/pid"), data in $dir/data)"
  env_lines "$dir"
}

# SIGTERM, then SIGKILL whatever is still there three seconds later: a graceful stop takes
# about 15 s (the filer retries flushing its metadata log after the volume server is gone), and
# a killed weed loses nothing it acknowledged (its writes are in the page cache).
stop() {
  local dir="$1" pid
  dir="$(cd "$dir" 2>/dev/null && pwd)" || return 0
  if running "$dir"; then
    pid="$(cat "$dir/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    # Gone, ports released, before a restart binds them again.
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  fi
  rm -f "$dir/pid"
  # weed's own unix sockets beside its gRPC ports (fixed under /tmp), left by a kill.
  if [[ -f "$dir/ports" ]]; then
    # shellcheck disable=SC1091
    source "$dir/ports"
    rm -f "/tmp/seaweedfs-master-grpc-$master_grpc.sock" "/tmp/seaweedfs-volume-grpc-$volume_grpc.sock" \
      "/tmp/seaweedfs-filer-grpc-$filer_grpc.sock" "/tmp/seaweedfs-s3-grpc-$s3_grpc.sock"
  fi
}

if [[ $# -eq 1 && "$1" == build ]]; then build; exit 0; fi
[[ $# -eq 2 ]] || usage
case "$1" in
  start) start "$2" ;;
  stop) stop "$2" ;;
  *) usage ;;
esac
