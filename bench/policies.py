#!/usr/bin/env python3
"""Adds policies to a running Nexus for bench/run.sh's policy series, one request each over one
keep-alive mTLS connection (as the superuser), and prints how long the writes took.

    bench/policies.py URL CA_PEM SVID_DIR FROM TO

Creates `other-FROM` .. `other-(TO-1)`. None names the benchmark's caller
(spiffe://spike.ist/app/bench): even-numbered ones name one exact SPIFFE ID, odd-numbered ones a
regular expression over a team's IDs, so both ways of matching a caller are in the book.
"""
import http.client
import json
import ssl
import sys
import time
from urllib.parse import urlparse


def connect(url, ctx):
    u = urlparse(url)
    return http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=60)


def main():
    url, ca, svid, lo, hi = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(f"{svid}/svid.pem", f"{svid}/svid_key.pem")
    conn = connect(url, ctx)
    started = time.monotonic()
    last = []
    for i in range(lo, hi):
        if i % 2 == 0:
            spiffe = f"^spiffe://spike\\.ist/app/other-{i}$"
        else:
            spiffe = f"^spiffe://spike\\.ist/team-{i}/[a-z]+$"
        body = json.dumps({
            "name": f"other-{i:05}",
            "spiffeidPattern": spiffe,
            "pathPattern": f"^other/{i}/.+$",
            "permissions": ["read", "list"],
        })
        t0 = time.monotonic()
        for attempt in range(5):
            try:
                conn.request("POST", "/v1/acl/policy", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                if attempt == 4:
                    raise
                conn.close()
                conn = connect(url, ctx)
        if resp.status != 200:
            sys.exit(f"policies.py: policy {i}: HTTP {resp.status} {data!r}")
        last = (last + [time.monotonic() - t0])[-100:]
    took = time.monotonic() - started
    print(f"{hi - lo} policies written in {took:.1f} s; the last {len(last)} took "
          f"{1000 * sum(last) / max(len(last), 1):.1f} ms each")


if __name__ == "__main__":
    main()
