# Sourced by the test-service scripts: a free TCP port on 127.0.0.1 for a server that binds it
# a moment later.
#
# The port comes from below the kernel's ephemeral range (ip_local_port_range). A port from
# inside it can be taken between our check and the server's bind by any outgoing connection
# or any listener bound to port 0 (every `spike` the tests start), which is how a standby once
# failed with "Address already in use". Below the range only the other scripts pick ports, and
# their callers retry on a bind failure.

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_port() {
  local low=32768 lo=10000 p
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt $((lo + 1000)) ] || lo=1024
  for _ in $(seq 1 200); do
    p=$((lo + RANDOM % (low - lo)))
    if ! port_in_use "$p"; then echo "$p"; return 0; fi
  done
  echo "no free port found below $low" >&2
  return 1
}
