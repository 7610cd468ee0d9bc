#!/usr/bin/env bash
# Builds the release binary as one fully static executable (x86_64 musl), checks that it is
# static, and prints its path on the last line of stdout.
#
#   packaging/build-release.sh            # then: packaging/deb/build.sh "$(packaging/build-release.sh | tail -1)"
#
# What musl needs: the Rust target (`rustup target add x86_64-unknown-linux-musl`) and a C compiler
# for musl, because the crate compiles C: SQLite (rusqlite `bundled`) and ring's C and assembly
# parts. On Debian that compiler is `musl-gcc` from the musl-tools package. Nothing links against
# the system's libc or OpenSSL (TLS is rustls with ring), so no other C library is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  cat >&2 <<EOF
build-release.sh: the Rust target $target is not installed. Add it with:
    rustup target add $target
and, for the C parts (SQLite, ring), a musl C compiler:
    apt-get install musl-tools
EOF
  exit 1
fi

cc_var="CC_${target//-/_}"
if [[ -z "${!cc_var:-}" ]] && ! command -v musl-gcc >/dev/null 2>&1; then
  cat >&2 <<EOF
build-release.sh: no C compiler for $target (musl-gcc not found, $cc_var not set).
SQLite and ring are compiled from C; install one with:
    apt-get install musl-tools
EOF
  exit 1
fi

# Built, then linked with the functions the servers run placed together (packaging/link-order.sh).
bin=$(packaging/link-order.sh build "$target" | tail -1)

# The check: `file` says statically linked, and there is no program interpreter or shared
# library for `ldd` to find.
description="$(file -b "$bin")"
echo "file: $description" >&2
if ! grep -Eq 'static(-pie)? linked|statically linked' <<<"$description"; then
  echo "build-release.sh: $bin is not statically linked" >&2
  exit 1
fi
if ldd "$bin" 2>/dev/null | grep -q '=>'; then
  echo "build-release.sh: ldd lists shared libraries for $bin:" >&2
  ldd "$bin" >&2 || true
  exit 1
fi
"$bin" --version >&2
echo "$bin"
