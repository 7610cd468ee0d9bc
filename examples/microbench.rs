//! Micro-benchmarks of the hot pure functions (standard library timing, no harness):
//! seal/open of a secret-sized value, a policy check over 50 policies, shard split/combine.
//! `cargo run --release --example microbench`. Figures only; nothing asserts on them.

use std::hint::black_box;
use std::time::Instant;

use spike::crypto::{RootKey, combine, split};
use spike::identity::SpiffeId;
use spike::nexus::policy::{self, Permission};
use spike::protocol::nexus::PolicyPutRequest;

fn time(name: &str, iterations: u32, mut f: impl FnMut()) {
    for _ in 0..iterations / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{name:<40} {ns:>10.0} ns/op");
}

fn main() {
    let root = RootKey::generate().expect("rng");
    let key = root.derive("spike/secrets/v1");
    let value = br#"{"password":"0123456789abcdef0123456789abcdef","username":"bench"}"#;
    let aad = b"spike/secret/v1\x00bench/secret\x001";
    let sealed = key.seal(aad, value).expect("seal");
    time("seal 70-byte secret (AES-256-GCM)", 200_000, || {
        black_box(key.seal(aad, black_box(value)).expect("seal"));
    });
    time("open 70-byte secret (AES-256-GCM)", 200_000, || {
        black_box(key.open(aad, black_box(&sealed)).expect("open"));
    });

    let policies: Vec<_> = (0..50)
        .map(|i| {
            policy::validate(&PolicyPutRequest {
                name: format!("p{i}"),
                spiffeid_pattern: format!("^spiffe://spike.ist/app/service-{i}$"),
                path_pattern: format!("^secrets/service-{i}/.*$"),
                permissions: vec!["read".into(), "list".into()],
            })
            .expect("valid policy")
        })
        .collect();
    let caller = SpiffeId::parse("spiffe://spike.ist/app/service-49").expect("id");
    time("policy check, 50 policies, last matches", 50_000, || {
        black_box(policy::allowed(
            black_box(&policies),
            &caller,
            "secrets/service-49/db",
            &[Permission::Read],
        ));
    });

    time("split root key, 3 shares threshold 2", 20_000, || {
        black_box(split(black_box(&root), 2, 3).expect("split"));
    });
    let shares = split(&root, 2, 3).expect("split");
    time("combine 2 shares", 20_000, || {
        black_box(combine(black_box(&shares[..2])).expect("combine"));
    });
}
