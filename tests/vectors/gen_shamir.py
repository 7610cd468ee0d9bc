#!/usr/bin/env python3
"""Generate tests/vectors/shamir.json: Shamir test vectors for spike's crypto module.

What it computes (independently of the Rust code, integers + hashlib only):

* Keeper shards exactly as SPIKE makes them (spike-sdk-go crypto.ComputeShares:
  circl secretsharing.New(NewDeterministicReader(rootKey), t-1, rootKey) over
  group.P256, then Share(n); circl >= v1.6.2, whose P-256 RandomScalar is
  Go's crypto/rand.Int(reader, n)):
    f(x) = c0 + c1 x + ... + c_{t-1} x^{t-1} mod n,  c0 = root key (big-endian),
    c1..c_{t-1} drawn in order from the byte stream B0 || B1 || ... with
    B0 = SHA-256(root key), B(i+1) = SHA-256(Bi); each draw takes one 32-byte
    block, reads it big-endian and accepts it if < n (else takes the next).
    Shard i (1..N) = f(i) as 32 big-endian bytes.
* "keeper_hash_to_scalar": Keeper shards as SPIKE releases up to v0.8.0 make them
  (circl v1.6.1, whose P-256 RandomScalar is HashToScalar(block, nil)): the same
  polynomial shape and block chain, but coefficient j is
  OS2IP(expand_message_xmd(SHA-256, B(j-1), DST = "", 48 bytes)) mod n and no
  block is ever rejected (RFC 9380 hash_to_field).
* spike's recovery shards: the same as "keeper", but B0 = SHA-256(b"spike/recovery-shards/v1" || root key).
* "stream_cases": raw coefficient draws from a chosen B0, including blocks >= n,
  to pin the rejection-sampling behaviour (real keys essentially never hit it).

Regenerate (from the repository root):
    python3 tests/vectors/gen_shamir.py > tests/vectors/shamir.json
The output is deterministic; the Rust tests in src/crypto/shamir.rs include it.
"""

import hashlib
import json
import sys

# P-256 group order.
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

RECOVERY_PREFIX = b"spike/recovery-shards/v1"


def sha256(data):
    return hashlib.sha256(data).digest()


def draw(b0, count):
    """Go crypto/rand.Int(reader, N) `count` times over the SHA-256 block chain from b0."""
    block = b0
    out = []
    while len(out) < count:
        value = int.from_bytes(block, "big")  # 256-bit N: no top-byte masking
        block = sha256(block)
        if value < N:
            out.append(value)
    return out


def expand_message_xmd(msg, length, dst=b""):
    """RFC 9380 section 5.3.1 with SHA-256."""
    dst_prime = dst + bytes([len(dst)])
    b0 = sha256(bytes(64) + msg + length.to_bytes(2, "big") + b"\0" + dst_prime)
    blocks = [sha256(b0 + b"\1" + dst_prime)]
    for i in range(2, (length + 31) // 32 + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, blocks[-1]))
        blocks.append(sha256(mixed + bytes([i]) + dst_prime))
    return b"".join(blocks)[:length]


def draw_hash_to_scalar(b0, count):
    """circl v1.6.1 group.P256.RandomScalar `count` times over the block chain from b0."""
    block = b0
    out = []
    for _ in range(count):
        out.append(int.from_bytes(expand_message_xmd(block, 48), "big") % N)
        block = sha256(block)
    return out


def shares(key, threshold, count, b0, draw=draw):
    coeffs = [int.from_bytes(key, "big")] + draw(b0, threshold - 1)
    result = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % N
        result.append((x, y))
    return result


def hex32(value):
    return value.to_bytes(32, "big").hex()


KEYS = [
    ("one", (1).to_bytes(32, "big")),
    ("all-01", bytes([1] * 32)),
    ("sha256-test-key-1", sha256(b"spike test key 1")),
    ("n-minus-1", (N - 1).to_bytes(32, "big")),
    ("high-bytes", bytes.fromhex("fffffffe" + "ab" * 28)),
]

PARAMS = [(1, 1), (2, 3), (3, 5), (5, 5), (2, 255)]

# For 255-share sets only these indices are written, to keep the file small.
SPARSE = [1, 2, 3, 127, 128, 254, 255]


def main():
    cases = []
    for name, key in KEYS:
        k = int.from_bytes(key, "big")
        assert 0 < k < N, name
        for t, n in PARAMS:
            keep = set(SPARSE) if n > 5 else set(range(1, n + 1))
            keeper = shares(key, t, n, sha256(key))
            keeper_h2s = shares(key, t, n, sha256(key), draw_hash_to_scalar)
            recovery = shares(key, t, n, sha256(RECOVERY_PREFIX + key))
            cases.append({
                "name": f"{name} t={t} n={n}",
                "key": key.hex(),
                "threshold": t,
                "shares": n,
                "keeper": [{"index": i, "value": hex32(v)} for i, v in keeper if i in keep],
                "keeper_hash_to_scalar": [
                    {"index": i, "value": hex32(v)} for i, v in keeper_h2s if i in keep
                ],
                "recovery": [{"index": i, "value": hex32(v)} for i, v in recovery if i in keep],
            })
    stream_cases = []
    for b0 in [
        (N).to_bytes(32, "big"),          # exactly n: rejected
        b"\xff" * 32,                     # above n: rejected
        (N - 1).to_bytes(32, "big"),      # largest accepted value
        bytes(32),                        # zero is a valid draw
        sha256(b"stream"),
    ]:
        stream_cases.append({
            "b0": b0.hex(),
            "coefficients": [hex32(v) for v in draw(b0, 3)],
            "hash_to_scalar": [hex32(v) for v in draw_hash_to_scalar(b0, 3)],
        })
    json.dump({
        "description": "SPIKE-compatible Shamir shards over P-256 (see gen_shamir.py)",
        "order_n": hex32(N),
        "cases": cases,
        "stream_cases": stream_cases,
    }, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
