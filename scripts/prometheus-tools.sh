#!/usr/bin/env bash
# The Prometheus tools the metrics tests check against, installed once under
# ${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools} and then reused:
#   - the official Python client (prometheus-client), whose two exposition parsers
#     (Prometheus text 0.0.4 and OpenMetrics) read what Nexus and Keeper serve;
#   - promtool (`check metrics`, `check config`, `check rules`, `test rules`), taken from
#     Debian's prometheus package without installing the package (no server, no service).
#
#   scripts/prometheus-tools.sh    # installs if needed; prints PROM_PYTHON=... and PROMTOOL=...
set -euo pipefail

CLIENT_VERSION=0.26.0
tools="${SPIKE_TOOLS_DIR:-$HOME/.cache/spike-tools}"
venv="$tools/prometheus-client-$CLIENT_VERSION"
promdir="$tools/promtool"

install_client() {
  # The stamp is written last, so an interrupted install is redone from scratch.
  [[ -f "$venv/.installed" ]] && return
  echo "prometheus-tools.sh: installing prometheus-client $CLIENT_VERSION into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "prometheus-client==$CLIENT_VERSION" >&2
  touch "$venv/.installed"
}

install_promtool() {
  [[ -f "$promdir/.installed" ]] && return
  echo "prometheus-tools.sh: extracting promtool from Debian's prometheus package into $promdir" >&2
  local work
  work="$(mktemp -d "${TMPDIR:-/tmp}/promtool.XXXXXX")"
  # apt-get download needs the package lists; refresh them once if it cannot find the package.
  if ! (cd "$work" && apt-get download prometheus >&2 2>/dev/null); then
    apt-get update -qq >&2
    (cd "$work" && apt-get download prometheus >&2)
  fi
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
  rm -rf "$promdir"
  mkdir -p "$promdir"
  cp "$work/x/usr/bin/promtool" "$promdir/promtool"
  rm -rf "$work"
  "$promdir/promtool" --version >&2
  touch "$promdir/.installed"
}

install_client
install_promtool
echo "PROM_PYTHON=$venv/bin/python"
echo "PROMTOOL=$promdir/promtool"
