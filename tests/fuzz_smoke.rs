#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Each fuzzing entry point (`spike::fuzzing`) on a bounded, deterministic set of inputs:
//! random bytes, and mutations (bit flips, truncations, splices) of valid seeds. A panic fails
//! the test. Coverage-guided runs: the cargo-fuzz targets in `fuzz/`, run by `./test` for a
//! bounded time (`scripts/fuzz.sh`). An input libFuzzer found crashing belongs in the seeds here,
//! as a regression case.

type Target = fn(&[u8]);

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8], seeds: &[&[u8]]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.truncate(rng.below(v.len() + 1)),
            2 => {
                let other = seeds[rng.below(seeds.len())];
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.splice(at..at, other[from..].iter().copied());
            }
            3 => {
                let i = rng.below(v.len() + 1);
                v.insert(
                    i,
                    b"\"[]{}:,.\\/%0^$*"
                        .get(rng.below(16))
                        .copied()
                        .unwrap_or(b'x'),
                );
            }
            _ => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v
}

fn run(name: &str, target: Target, seeds: &[&[u8]]) {
    run_n(name, target, seeds, 20_000);
}

/// [`run`] with `iterations` generated inputs, for targets whose inputs are costly.
fn run_n(name: &str, target: Target, seeds: &[&[u8]], iterations: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let mut count = 0;
    for seed in seeds {
        target(seed);
        count += 1;
    }
    for _ in 0..iterations {
        let input = if rng.below(4) == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed, seeds)
        };
        target(&input);
        count += 1;
    }
    println!("{name}: {count} inputs, no panic");
}

#[test]
fn request_json() {
    run(
        "request_json",
        spike::fuzzing::request_json,
        &[
            br#"{"path":"a/b","values":{"k":"v"},"cas":1,"request_id":"x"}"#,
            br#"{"path":"a","version":3}"#,
            br#"{"path":"a","versions":[1,2,0]}"#,
            br#"{"name":"n","spiffeidPattern":"^spiffe://x/y$","pathPattern":"^a$","permissions":["read"]}"#,
            br#"{"id":1,"shard":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32]}"#,
            br#"{"version":1,"nonce":"AAAAAAAAAAAAAAAA","ciphertext":"AQID"}"#,
            br#"{"shard":null,"Err":"api_bad_request"}"#,
        ],
    );
}

#[test]
fn secret_path() {
    run(
        "secret_path",
        spike::fuzzing::secret_path,
        &[
            b"secrets/db/creds",
            b"a/../b",
            b"spike/system/acl",
            b"a//b",
            b"(x)|[y]{z}\\",
        ],
    );
}

#[test]
fn policy_pattern() {
    run(
        "policy_pattern",
        spike::fuzzing::policy_pattern,
        &[
            b"^spiffe://spike.ist/app/web$\n^secrets/web/.*$\nread,list",
            b"spiffe://.*\n.*\nsuper",
            b"spiffe://x/(a{100}){100}\n(a*)*b\nwrite",
            b"^spiffe://spike.ist/ops$\n^spike/system/acl$\nwrite",
            b"^spiffe://spike\\.ist/app/web$\nsecrets/web-1\nread",
            b"spiffe://spike\\.ist/app\n^a\\.b\\-c$\nread",
        ],
    );
}

#[test]
fn recovery_shard() {
    run(
        "recovery_shard",
        spike::fuzzing::recovery_shard,
        &[
            b"spike:1:0101010101010101010101010101010101010101010101010101010101010101",
            b"spike:255:FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632550\n",
            b"spike:0:00",
        ],
    );
}

#[test]
fn cipher_open() {
    let mut framed = vec![1u8];
    framed.extend_from_slice(&[0u8; 12]);
    framed.extend_from_slice(&[0xAA; 40]);
    run(
        "cipher_open",
        spike::fuzzing::cipher_open,
        &[&framed, &[1], &[2, 0, 0]],
    );
}

#[test]
fn spike_store() {
    // Each input is a database file SQLite opens: fewer of them.
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/spike-main/spike.db"
    ))
    .unwrap();
    run_n(
        "spike_store",
        spike::fuzzing::spike_store,
        &[
            &fixture,
            &fixture[..fixture.len() / 2],
            b"2026-11-29 20:16:31.67768105+00:00",
            b"SQLite format 3\0",
        ],
        5_000,
    );
}

#[test]
fn backup_file() {
    // A header and records: the target appends correct trailers, so these get past the hash
    // (and, version 2, the MAC).
    let body = |version: u32| {
        format!(
            concat!(
                r#"{{"format":"spike-backup","version":{},"created":"2026-01-01T00:00:00Z","backend":"sqlite","consistency":"store","key_id":"0011223344556677","records":2,"secrets":1,"policies":0,"system":1}}"#,
                "\n",
                r#"{{"ns":"secrets","key":"a/b","value":"AQID"}}"#,
                "\n",
                r#"{{"ns":"system","key":"root-key-verifier","value":"eyJrZXlfaWQiOiIwMDExMjIzMzQ0NTU2Njc3Iiwic2VhbGVkIjoiQUE9PSJ9"}}"#,
                "\n"
            ),
            version
        )
    };
    let (v1, v2) = (body(1), body(2));
    run(
        "backup_file",
        spike::fuzzing::backup_file,
        &[
            v1.as_bytes(),
            v2.as_bytes(),
            b"{}\n",
            br#"{"end":"spike-backup","records":0,"sha256":""}"#,
        ],
    );
}
