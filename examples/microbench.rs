//! Micro-benchmarks of the hot pure functions (standard library timing, no harness):
//! seal/open of a secret-sized value, policy checks, the policy book's decoding, shard
//! split/combine. `cargo run --release --example microbench`. Figures only; nothing asserts on
//! them.

use std::hint::black_box;
use std::time::Instant;

use spike::crypto::{RootKey, combine, split};
use spike::identity::SpiffeId;
use spike::nexus::book::{self, Book};
use spike::nexus::policy::{self, Permission, Rule, StoredPolicy};
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
    println!("{name:<52} {ns:>10.0} ns/op");
}

/// `n` policies for other services, half of them with a regular expression for the ID, and
/// the last one naming `spiffe://spike.ist/app/service-bench`.
fn policies(n: usize) -> Vec<StoredPolicy> {
    (0..n)
        .map(|i| {
            let (id, path) = if i + 1 == n {
                (
                    "^spiffe://spike\\.ist/app/service-bench$".to_string(),
                    "^secrets/service-bench/.*$".to_string(),
                )
            } else if i % 2 == 0 {
                (
                    format!("^spiffe://spike\\.ist/app/service-{i}$"),
                    format!("^secrets/service-{i}/.*$"),
                )
            } else {
                (
                    format!("^spiffe://spike\\.ist/team-{i}/[a-z]+$"),
                    format!("^secrets/team-{i}/.*$"),
                )
            };
            policy::validate(&PolicyPutRequest {
                name: format!("p{i:05}"),
                spiffeid_pattern: id,
                path_pattern: path,
                permissions: vec!["read".into(), "list".into()],
            })
            .expect("valid policy")
        })
        .collect()
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

    let caller = SpiffeId::parse("spiffe://spike.ist/app/service-bench").expect("id");
    let rules: Vec<Rule> = policies(50).into_iter().map(Rule::new).collect();
    time(
        "policy check, 50 rules in turn, last matches",
        50_000,
        || {
            black_box(
                rules
                    .iter()
                    .any(|r| r.allows(&caller, "secrets/service-bench/db", &[Permission::Read])),
            );
        },
    );
    for n in [1, 100, 1_000, 10_000] {
        let book = Book::detached(policies(n));
        let check = || {
            book.naming(&caller).iter().any(|&i| {
                book.rule(i).is_some_and(|r| {
                    r.grants(&[Permission::Read]) && r.reaches("secrets/service-bench/db")
                })
            })
        };
        assert!(check());
        time(
            &format!("policy check via the book, {n} policies"),
            200_000,
            || {
                black_box(check());
            },
        );
    }
    let key = root.derive("spike/policies/v1");
    for n in [100, 10_000] {
        let set = policies(n);
        let stored = book::seal(&key, 7, &set).expect("seal");
        let iterations = if n > 1000 { 20 } else { 2_000 };
        time(
            &format!("seal a policy book of {n} ({} bytes)", stored.len()),
            iterations,
            || {
                black_box(book::seal(&key, 7, black_box(&set)).expect("seal"));
            },
        );
        time(
            &format!("open and decode a policy book of {n}"),
            iterations,
            || {
                black_box(book::open(&key, black_box(&stored)).expect("open"));
            },
        );
        time(
            &format!("build a book of {n} (no rules to reuse)"),
            iterations,
            || {
                black_box(Book::detached(set.clone()));
            },
        );
    }

    time("split root key, 3 shares threshold 2", 20_000, || {
        black_box(split(black_box(&root), 2, 3).expect("split"));
    });
    let shares = split(&root, 2, 3).expect("split");
    time("combine 2 shares", 20_000, || {
        black_box(combine(black_box(&shares[..2])).expect("combine"));
    });
}
