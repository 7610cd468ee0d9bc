#!/usr/bin/env bash
# Builds spike_<version>_amd64.deb from a built binary, with dpkg-deb alone (no debhelper).
#
#   packaging/deb/build.sh [BINARY [OUTDIR]]
#
# BINARY defaults to the static release binary packaging/build-release.sh makes; OUTDIR to dist/.
# The version comes from `BINARY --version`, the completions from `BINARY completions SHELL`,
# the man pages from man/. Prints the path of the .deb on the last line of stdout.
# SPIKE_DEB_COMPRESSION (default xz) is passed to dpkg-deb -Z; the tests use none.
# SPIKE_DEB_MAINTAINER sets the Maintainer field (a placeholder by default).
#
# The package installs the units but never enables, starts or restarts them: a Nexus or Keeper
# needs its SVID and /etc/spike/*.env first, and restarting every Keeper and Nexus at once (an
# unattended upgrade on every host) would drop the root key from memory everywhere and leave
# the cluster waiting for an operator restore. Restart them one host at a time.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-musl/release/spike}"
outdir="${2:-$root/dist}"

die() {
  echo "deb/build.sh: $*" >&2
  exit 1
}

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian package dpkg)"
command -v file >/dev/null || die "file not found (Debian package file)"
[[ -x "$bin" ]] || die "no executable at $bin (build it with packaging/build-release.sh, or pass BINARY)"

description="$(file -b "$bin")"
[[ "$description" == *x86-64* ]] || die "$bin is not an x86-64 executable: $description"

# "spike 0.1.0" -> "0.1.0"
version="$("$bin" --version | awk '{print $2}')"
[[ "$version" =~ ^[0-9][0-9A-Za-z.+~-]*$ ]] || die "cannot read a version from $bin --version"

# A static binary needs nothing; a dynamically linked one (a debug build) needs the C library.
depends="adduser"
if [[ "$description" == *dynamically\ linked* ]]; then
  echo "deb/build.sh: warning: $bin is dynamically linked; the package will depend on libc6" >&2
  depends="libc6, $depends"
fi

export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}"

work="$(mktemp -d "${TMPDIR:-/tmp}/spike-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
pkg="$work/spike_${version}_amd64"
umask 022

install -D -m 0755 "$bin" "$pkg/usr/bin/spike"
# As dh_strip does: symbols and debug info out of the shipped binary.
if command -v strip >/dev/null; then
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg/usr/bin/spike"
fi
for unit in spike-nexus.service spike-keeper.service spike-backup.service spike-backup.timer; do
  install -D -m 0644 "$root/systemd/$unit" "$pkg/lib/systemd/system/$unit"
done

install -D -m 0644 "$root/packaging/logrotate/spike-nexus" "$pkg/etc/logrotate.d/spike-nexus"

install -d -m 0750 "$pkg/etc/spike"
for env in nexus.env keeper.env; do
  install -m 0640 "$root/packaging/env/$env" "$pkg/etc/spike/$env"
done

# Man pages from man/ (tests/packaging.rs keeps them equal to the clap definitions);
# completions from the binary being packaged.
install -d "$pkg/usr/share/man/man1"
for page in "$root"/man/*.1; do
  gzip -9n <"$page" >"$pkg/usr/share/man/man1/$(basename "$page").gz"
  chmod 0644 "$pkg/usr/share/man/man1/$(basename "$page").gz"
done
install -d "$pkg/usr/share/bash-completion/completions" \
  "$pkg/usr/share/zsh/vendor-completions" "$pkg/usr/share/fish/vendor_completions.d"
"$bin" completions bash >"$pkg/usr/share/bash-completion/completions/spike"
"$bin" completions zsh >"$pkg/usr/share/zsh/vendor-completions/_spike"
"$bin" completions fish >"$pkg/usr/share/fish/vendor_completions.d/spike.fish"

doc="$pkg/usr/share/doc/spike"
install -D -m 0644 "$root/packaging/haproxy/spike-nexus.cfg" "$doc/examples/haproxy/spike-nexus.cfg"
install -D -m 0644 "$root/packaging/nginx/spike-nexus.conf" "$doc/examples/nginx/spike-nexus.conf"
maintainer="${SPIKE_DEB_MAINTAINER:-spike developers <spike@example.org>}"
year="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: spike

Files: *
Copyright: $year the spike contributors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found
 in /usr/share/common-licenses/Apache-2.0.
EOF
# A native package's changelog, one entry for this build.
{
  printf 'spike (%s) unstable; urgency=medium\n\n  * Release %s.\n\n' "$version" "$version"
  printf ' -- %s  %s\n' "$maintainer" "$(date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
# Deliberate departures from lintian's defaults, with the reason.
install -d "$pkg/usr/share/lintian/overrides"
cat >"$pkg/usr/share/lintian/overrides/spike" <<'EOF'
# The environment files may hold a database password: root:spike 0640 in a 0750 directory.
spike: non-standard-dir-perm 0750 != 0755 [etc/spike/]
spike: non-standard-file-perm 0640 != 0644 [etc/spike/keeper.env]
spike: non-standard-file-perm 0640 != 0644 [etc/spike/nexus.env]
# unsafe-libyaml (via serde_yaml_ng) is a Rust translation of libyaml, not the C library.
spike: embedded-library libyaml [usr/bin/spike]
# The release binary is static-pie: an ET_DYN file with no DT_NEEDED, which lintian takes for
# a shared library without dependencies.
spike: shared-library-lacks-prerequisites [usr/bin/spike]
EOF
chmod 0644 "$pkg/usr/share/lintian/overrides/spike"

install -d "$pkg/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$pkg/DEBIAN/$script"
done
printf '%s\n' /etc/spike/nexus.env /etc/spike/keeper.env /etc/logrotate.d/spike-nexus >"$pkg/DEBIAN/conffiles"
chmod 0644 "$pkg/DEBIAN/conffiles"

installed_size="$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)"
cat >"$pkg/DEBIAN/control" <<EOF
Package: spike
Version: $version
Architecture: amd64
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Section: admin
Priority: optional
Homepage: https://github.com/spiffe/spike
Description: SPIFFE-native secrets manager (Nexus, Keepers, recovery shards)
 One static executable: the Nexus secrets API, the Keepers that hold shards of
 the root key in memory, and the client (spike secret, spike policy, ...).
 Workloads authenticate with X.509 SVIDs over mutual TLS. Ships systemd units
 (not enabled), example environment files in /etc/spike and example
 HAProxy and nginx configurations for TLS passthrough.
EOF
chmod 0644 "$pkg/DEBIAN/control"

mkdir -p "$outdir"
deb="$outdir/spike_${version}_amd64.deb"
dpkg-deb --build --root-owner-group -Z"${SPIKE_DEB_COMPRESSION:-xz}" "$pkg" "$deb" >&2
echo "$deb"
