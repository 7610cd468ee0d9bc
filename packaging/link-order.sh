#!/usr/bin/env bash
# The function order of the release executable: the functions a running Keeper and Nexus execute
# are linked next to each other at the start of .text, so each process maps only the pages that
# hold code it runs. The kernel maps executable pages 64 KiB at a time (fault-around); in
# compiler order, the few functions a Keeper runs are spread over most of the 13 MB of code, and
# every one of them drags in its cold neighbours. Measured on the static build: a Keeper
# 8.0 -> 5.1 MiB resident when idle, 10.0 -> 6.5 MiB after serving Nexus (bench/README.md).
#
#   packaging/link-order.sh record         run a Keeper and a Nexus under valgrind's callgrind,
#                                          exercise them, and rewrite packaging/link-order.txt
#                                          (needs valgrind: apt-get install valgrind)
#   packaging/link-order.sh resolve BIN    print the symbol ordering file for BIN: the mangled
#                                          names in BIN of the functions in link-order.txt, in order
#   packaging/link-order.sh build [TARGET] cargo build --release the spike binary (for TARGET, or
#                                          the host), link it again in that order, print its path
#
# link-order.txt holds names without the parts that change from build to build (the legacy
# `17h<hash>E` and v0 `Cs<hash>_` crate disambiguators, ThinLTO's `.llvm.<n>` suffixes), so it
# survives code changes, compiler upgrades and another target; `resolve` maps them back to this
# build's symbols. A function missing from the list is only linked further away: the list is an
# optimisation, never needed for correctness. Record it again after large changes to the request
# paths (build-release.sh prints how many listed functions it found).
set -euo pipefail
cd "$(dirname "$0")/.."
list=packaging/link-order.txt

# The build-independent form of a symbol name (one per line on stdin).
normalize() { sed -E 's/\.llvm\.[0-9]+$//; s/17h[0-9a-f]{16}E$/E/; s/Cs[0-9a-zA-Z]*_/C/g'; }

resolve() {
  local bin=$1 syms
  syms=$(mktemp)
  nm --defined-only "$bin" | awk '$2 ~ /^[tTW]$/ { print $3 }' >"$syms"
  # normalized <TAB> mangled, then every mangled name of each listed function, in list order.
  paste <(normalize <"$syms") "$syms" |
    awk -F'\t' 'NR == FNR { m[$1] = m[$1] $2 "\n"; next } ($0 in m) { printf "%s", m[$0]; delete m[$0] }' - "$list"
  rm -f "$syms"
}

# Build, resolve the order against the symbols of that build, and link once more with it. The link
# is rust-lld's, which rustc ships (GNU ld cannot order symbols); the flags are the bin target's
# only, so nothing but the final link is redone. The ordering file is named after its content and
# the first build reuses the last one, so a build with nothing changed links nothing.
build() {
  local target=${1:-} args=() dir
  dir="${CARGO_TARGET_DIR:-$PWD/target}"
  if [ -n "$target" ]; then args=(--target "$target"); dir="$dir/$target"; fi
  dir="$dir/release"
  local bin="$dir/spike" host gcc_ld
  host=$(rustc -vV | sed -n 's/^host: //p')
  gcc_ld="$(rustc --print sysroot)/lib/rustlib/$host/bin/gcc-ld"
  if [ ! -x "$gcc_ld/ld.lld" ]; then
    echo "link-order.sh: $gcc_ld/ld.lld not found; $bin stays in compiler order (larger resident size)" >&2
    cargo build --release --locked "${args[@]}" --bin spike >&2
    echo "$bin"
    return
  fi
  ordered() { # ORDER_FILE: build the executable linked in that order
    cargo rustc --release --locked "${args[@]}" --bin spike -- \
      -C link-arg=-fuse-ld=lld -C "link-arg=-B$gcc_ld" \
      -C "link-arg=-Wl,--symbol-ordering-file=$1" -C link-arg=-Wl,--no-warn-symbol-ordering >&2
  }
  local last="" order
  [ -f "$dir/spike.link-order.last" ] && last=$(cat "$dir/spike.link-order.last")
  if [ -n "$last" ] && [ -f "$last" ]; then ordered "$last"; else cargo build --release --locked "${args[@]}" --bin spike >&2; fi
  resolve "$bin" >"$dir/spike.link-order.new"
  order="$dir/spike.link-order.$(sha256sum "$dir/spike.link-order.new" | cut -c1-16)"
  mv "$dir/spike.link-order.new" "$order"
  echo "link-order.sh: $(wc -l <"$order") symbols for the $(wc -l <"$list") functions in $list" >&2
  if [ "$order" != "$last" ]; then
    ordered "$order"
    echo "$order" >"$dir/spike.link-order.last"
    [ -n "$last" ] && rm -f "$last"
  fi
  echo "$bin"
}

record() {
  command -v valgrind >/dev/null || { echo "link-order.sh: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/spike-target-release}
  cargo build --release --locked --bin spike >&2
  local spike=$CARGO_TARGET_DIR/release/spike
  local td=spike.ist
  # Globals: the EXIT trap runs after this function's locals are gone.
  w=$(mktemp -d "${TMPDIR:-/tmp}/spike-link-order.XXXXXX")
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$w"' EXIT

  "$spike" pki init "$w/ca" --trust-domain "$td" >/dev/null
  issue() { "$spike" pki issue "$w/ca" --spiffe-id "spiffe://$td$2" --out "$w/$1" --dns localhost --ip 127.0.0.1 >/dev/null; }
  issue nexus /spike/nexus
  for i in 1 2 3; do issue "keeper-$i" "/spike/keeper/$i"; done
  issue superuser /spike/pilot/role/superuser
  issue app /app/x

  local vg=(valgrind --tool=callgrind --dump-instr=no --compress-strings=no --compress-pos=no --demangle=no)
  # Fixed loopback ports from a random base: free_port would race with valgrind's slow start.
  local base=$(( 20000 + RANDOM % 20000 )) peers="" i
  for i in 1 2 3; do
    local pre=()
    [ "$i" = 1 ] && pre=("${vg[@]}" "--callgrind-out-file=$w/keeper.cg")
    env -i PATH="$PATH" SPIKE_SVID_DIR="$w/keeper-$i" SPIKE_TRUST_ROOT=$td \
      SPIKE_KEEPER_TLS_PORT="127.0.0.1:$((base + i))" "${pre[@]}" "$spike" keeper >"$w/keeper-$i.log" 2>&1 &
    pids+=($!)
    peers=$peers${peers:+,}https://127.0.0.1:$((base + i))
  done
  sleep 5 # the Keeper under valgrind starts slowly; Nexus retries anyway
  env -i PATH="$PATH" SPIKE_SVID_DIR="$w/nexus" SPIKE_TRUST_ROOT=$td SPIKE_NEXUS_TLS_PORT="127.0.0.1:$base" \
    SPIKE_NEXUS_KEEPER_PEERS="$peers" SPIKE_NEXUS_BACKEND_STORE=sqlite SPIKE_NEXUS_DATA_DIR="$w/data" \
    "${vg[@]}" "--callgrind-out-file=$w/nexus.cg" "$spike" nexus >"$w/nexus.log" 2>&1 &
  local nexus=$!
  pids+=("$nexus")
  for _ in $(seq 1 300); do
    curl -s --cacert "$w/ca/ca.pem" "https://127.0.0.1:$base/health" | grep -q '"ready"' && break
    sleep 0.2
  done
  cli() {
    env -i PATH="$PATH" SPIKE_NEXUS_API_URL="https://127.0.0.1:$base" SPIKE_SVID_DIR="$w/$1" \
      SPIKE_TRUST_ROOT=$td "$spike" "${@:2}" >/dev/null
  }
  # The request paths a production Nexus serves all day: policies, secrets read and written by
  # a workload, listing, delete and undelete, and refusals.
  cli superuser policy create --name app --spiffeid-pattern '^spiffe://spike\.ist/app/x$' \
    --path-pattern '^app/.+$' --permissions read,write
  for i in 1 2 3; do
    cli superuser secret put app/db "user=u$i" "pass=p$i"
    cli app secret get app/db
    cli app secret put app/cache "k=$i"
    cli app secret get app/cache --version 1
  done
  cli superuser secret list
  cli superuser secret delete app/cache
  cli superuser secret undelete app/cache --versions 3
  cli superuser policy list
  cli app secret get other/x || true
  cli app secret get app/missing || true
  curl -s --cacert "$w/ca/ca.pem" "https://127.0.0.1:$base/health" >/dev/null
  kill -TERM "${pids[@]}"
  wait || true
  pids=()

  # Functions of the spike executable, in the order callgrind first lists them: the Keeper's
  # first, then what only Nexus runs.
  awk '/^ob=/ { ours = ($0 ~ /\/spike$/) } /^fn=/ && ours { print substr($0, 4) }' "$w/keeper.cg" "$w/nexus.cg" |
    normalize | awk '!seen[$0]++' >"$list.tmp"
  mv "$list.tmp" "$list"
  echo "link-order.sh: $(wc -l <"$list") functions in $list" >&2
}

case ${1:-} in
  record) record ;;
  resolve) [ $# = 2 ] || { echo "usage: $0 resolve BIN" >&2; exit 2; }; resolve "$2" ;;
  build) build "${2:-}" ;;
  *) echo "usage: $0 record | resolve BIN | build [TARGET]" >&2; exit 2 ;;
esac
