#!/usr/bin/env bash
# An S3-compatible server on 127.0.0.1 for tests (moto, made atomic and persistent by
# scripts/s3-test-server.py).
#
#   eval "$(scripts/s3.sh start DIR)"   # installs moto if needed, starts, prints the exports
#   scripts/s3.sh start DIR --ignore-conditional-writes   # a server spike must refuse (below)
#   scripts/s3.sh stop DIR
#
# --ignore-conditional-writes drops If-Match and If-None-Match from every request, as an S3
# server without conditional writes does: the peer for the test that Nexus refuses such a
# server. The mode is kept in DIR, so a restart keeps it.
#
# DIR holds the objects (DIR/data), the port, the pid and the log. Starting again on the same
# DIR reuses its port and its objects. The exports are SPIKE_TEST_S3_ENDPOINT, _BUCKET, _REGION,
# _ACCESS_KEY_ID and _SECRET_ACCESS_KEY. moto is installed once into a virtualenv under
# ${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}.
set -euo pipefail

MOTO_VERSION=5.2.5
BUCKET=spike-test
here="$(cd "$(dirname "$0")" && pwd)"
tools="${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}"
venv="$tools/moto-$MOTO_VERSION"

usage() {
  echo "usage: $0 start DIR [--ignore-conditional-writes] | stop DIR" >&2
  exit 2
}

install_moto() {
  # The stamp is written last, so an interrupted install is redone from scratch.
  [[ -f "$venv/.installed" ]] && return
  echo "s3.sh: installing moto $MOTO_VERSION into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
  touch "$venv/.installed"
}

# shellcheck source=ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

start() {
  local dir="$1" mode="${2:-}"
  mkdir -p "$dir/data"
  dir="$(cd "$dir" && pwd)"
  [[ -n "$mode" ]] && echo "$mode" >"$dir/mode"
  local extra=()
  [[ "$(cat "$dir/mode" 2>/dev/null)" == --ignore-conditional-writes ]] && extra=(--ignore-conditional-writes)
  install_moto
  if [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "s3.sh: already running in $dir" >&2
  else
    [[ -f "$dir/port" ]] || pick_port >"$dir/port"
    local port
    port="$(cat "$dir/port")"
    "$venv/bin/python" "$here/s3-test-server.py" --port "$port" --data "$dir/data" \
      --bucket "$BUCKET" "${extra[@]}" >>"$dir/log" 2>&1 &
    echo $! >"$dir/pid"
    local deadline=$((SECONDS + 30))
    until "$venv/bin/python" - "$port" "$BUCKET" <<'EOF' 2>/dev/null; do
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/{sys.argv[2]}", method="HEAD")
urllib.request.urlopen(req, timeout=1)
EOF
      if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null || ((SECONDS > deadline)); then
        echo "s3.sh: the S3 server did not start; its log:" >&2
        tail -n 30 "$dir/log" >&2 || true
        exit 1
      fi
      sleep 0.2
    done
    echo "s3.sh: S3 server on 127.0.0.1:$port (pid $(cat "$dir/pid"), data in $dir/data)" >&2
  fi
  cat <<EOF
export SPIKE_TEST_S3_ENDPOINT=http://127.0.0.1:$(cat "$dir/port")
export SPIKE_TEST_S3_BUCKET=$BUCKET
export SPIKE_TEST_S3_REGION=us-east-1
export SPIKE_TEST_S3_ACCESS_KEY_ID=spike-test
export SPIKE_TEST_S3_SECRET_ACCESS_KEY=spike-test-secret
EOF
}

stop() {
  local dir="$1" pid
  [[ -f "$dir/pid" ]] || return 0
  pid="$(cat "$dir/pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}

case "${1:-}:$#:${3:-}" in
  start:2:) start "$2" ;;
  start:3:--ignore-conditional-writes) start "$2" "$3" ;;
  stop:2:) stop "$2" ;;
  *) usage ;;
esac
