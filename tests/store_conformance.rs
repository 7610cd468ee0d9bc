#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! One conformance suite for the `Store` trait, run against every backend. A backend passes
//! when it gives exactly the semantics Nexus relies on: conditional writes that never let two
//! writers both win, revisions that change on every write and can be read alone, sorted prefix
//! listing, create-if-absent for the root-key verifier, and all of it across independent
//! handles on one store (two handles on one SQLite file behave like two processes).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use spike::crypto::Verifier;
use spike::store::memory::MemoryStore;
use spike::store::postgres::PostgresStore;
use spike::store::s3::S3Store;
use spike::store::sqlite::SqliteStore;
use spike::store::{Expect, Namespace, Store, Written};

async fn basic_kv(s: &impl Store) {
    let ns = Namespace::Secrets;
    assert!(s.get(ns, "a").await.unwrap().is_none());
    let Written::Done(r1) = s
        .put(ns, "a", b"one".to_vec(), Expect::Absent)
        .await
        .unwrap()
    else {
        panic!("create failed")
    };
    // Create-if-absent refuses an existing key and changes nothing.
    assert_eq!(
        s.put(ns, "a", b"other".to_vec(), Expect::Absent)
            .await
            .unwrap(),
        Written::Conflict
    );
    let e = s.get(ns, "a").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), &e.revision), (&b"one"[..], &r1));
    // Compare-and-set on the current revision works once; the old revision is then stale.
    let Written::Done(r2) = s
        .put(ns, "a", b"two".to_vec(), Expect::Revision(r1.clone()))
        .await
        .unwrap()
    else {
        panic!("cas failed")
    };
    assert_ne!(r1, r2);
    assert_eq!(
        s.put(ns, "a", b"three".to_vec(), Expect::Revision(r1.clone()))
            .await
            .unwrap(),
        Written::Conflict
    );
    assert_eq!(s.get(ns, "a").await.unwrap().unwrap().value, b"two");
    // A revision that was never handed out is just a conflict.
    assert_eq!(
        s.put(
            ns,
            "a",
            b"x".to_vec(),
            Expect::Revision(spike::store::Revision("nonsense".into()))
        )
        .await
        .unwrap(),
        Written::Conflict
    );
    // Namespaces are separate key spaces.
    assert!(s.get(Namespace::Policies, "a").await.unwrap().is_none());
    // Delete needs the current revision; a deleted key can be created again with a fresh
    // revision (no ABA).
    assert!(!s.delete(ns, "a", &r1).await.unwrap());
    assert!(s.delete(ns, "a", &r2).await.unwrap());
    assert!(s.get(ns, "a").await.unwrap().is_none());
    assert!(!s.delete(ns, "a", &r2).await.unwrap());
    let Written::Done(r3) = s
        .put(ns, "a", b"again".to_vec(), Expect::Absent)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_ne!(r3, r1);
    assert_ne!(r3, r2);
    assert!(s.delete(ns, "a", &r3).await.unwrap());
}

async fn listing(s: &impl Store) {
    let ns = Namespace::Secrets;
    for k in ["b/2", "a/1", "b/1", "b", "c%", "c_x", "ba"] {
        s.put(ns, k, vec![1], Expect::Absent).await.unwrap();
    }
    s.put(Namespace::Policies, "b/zzz", vec![1], Expect::Absent)
        .await
        .unwrap();
    assert_eq!(
        s.list(ns, "").await.unwrap(),
        vec!["a/1", "b", "b/1", "b/2", "ba", "c%", "c_x"]
    );
    assert_eq!(s.list(ns, "b/").await.unwrap(), vec!["b/1", "b/2"]);
    assert_eq!(
        s.list(ns, "b").await.unwrap(),
        vec!["b", "b/1", "b/2", "ba"]
    );
    // LIKE wildcards in a prefix are literal characters.
    assert_eq!(s.list(ns, "c%").await.unwrap(), vec!["c%"]);
    assert_eq!(s.list(ns, "c_").await.unwrap(), vec!["c_x"]);
    assert!(s.list(ns, "zz").await.unwrap().is_empty());
    // Namespaces are separate key spaces for listing too.
    assert_eq!(
        s.list(Namespace::Policies, "").await.unwrap(),
        vec!["b/zzz"]
    );
    assert!(s.list(Namespace::System, "").await.unwrap().is_empty());
}

/// A snapshot holds every record of every namespace with its bytes, sorted by namespace then
/// key, and leaves out what was deleted.
async fn snapshot(s: &impl Store) {
    assert!(s.snapshot().await.unwrap().records.is_empty());
    let rows: [(Namespace, &str, &[u8]); 5] = [
        (Namespace::System, "root-key-verifier", b"v"),
        (Namespace::Secrets, "b", &[0, 255, 10]),
        (Namespace::Secrets, "a/1", b"one"),
        (Namespace::Policies, "p", b"pol"),
        (Namespace::Secrets, "gone", b"x"),
    ];
    for (ns, k, v) in rows {
        s.put(ns, k, v.to_vec(), Expect::Absent).await.unwrap();
    }
    let rev = s
        .revision(Namespace::Secrets, "gone")
        .await
        .unwrap()
        .unwrap();
    assert!(s.delete(Namespace::Secrets, "gone", &rev).await.unwrap());
    let got: Vec<(Namespace, String, Vec<u8>)> = s.snapshot().await.unwrap().records;
    let want: Vec<(Namespace, String, Vec<u8>)> = [
        (Namespace::Secrets, "a/1", &b"one"[..]),
        (Namespace::Secrets, "b", &[0, 255, 10]),
        (Namespace::Policies, "p", b"pol"),
        (Namespace::System, "root-key-verifier", b"v"),
    ]
    .into_iter()
    .map(|(ns, k, v)| (ns, k.to_string(), v.to_vec()))
    .collect();
    assert_eq!(got, want);
}

/// The revision alone: absent for a missing key, the revision `get` gives for a present one,
/// a new one after every write, through every handle, gone after a delete.
async fn revisions<S: Store>(handles: Vec<Arc<S>>) {
    let (a, b) = (&handles[0], &handles[handles.len() - 1]);
    let ns = Namespace::System;
    assert_eq!(a.revision(ns, "book").await.unwrap(), None);
    let Written::Done(r1) = a
        .put(ns, "book", b"one".to_vec(), Expect::Absent)
        .await
        .unwrap()
    else {
        panic!("create failed")
    };
    assert_eq!(a.revision(ns, "book").await.unwrap().as_ref(), Some(&r1));
    assert_eq!(b.revision(ns, "book").await.unwrap().as_ref(), Some(&r1));
    assert_eq!(b.get(ns, "book").await.unwrap().unwrap().revision, r1);
    // Namespaces are separate; a key that only shares a prefix is another key.
    assert_eq!(a.revision(Namespace::Policies, "book").await.unwrap(), None);
    assert_eq!(a.revision(ns, "boo").await.unwrap(), None);
    let Written::Done(r2) = b
        .put(ns, "book", b"two".to_vec(), Expect::Revision(r1.clone()))
        .await
        .unwrap()
    else {
        panic!("cas failed")
    };
    assert_ne!(r1, r2);
    assert_eq!(a.revision(ns, "book").await.unwrap().as_ref(), Some(&r2));
    assert_eq!(a.get(ns, "book").await.unwrap().unwrap().revision, r2);
    // Whatever `revision` says is what a compare-and-set needs.
    let now = a.revision(ns, "book").await.unwrap().unwrap();
    let Written::Done(r3) = a
        .put(ns, "book", b"three".to_vec(), Expect::Revision(now))
        .await
        .unwrap()
    else {
        panic!("cas on the read revision failed")
    };
    assert_ne!(r3, r2);
    assert!(b.delete(ns, "book", &r3).await.unwrap());
    assert_eq!(a.revision(ns, "book").await.unwrap(), None);
}

async fn verifier(s: &impl Store) {
    assert!(s.verifier().await.unwrap().is_none());
    let v1 = Verifier {
        key_id: "k1".into(),
        sealed: vec![1, 2, 3],
    };
    let v2 = Verifier {
        key_id: "k2".into(),
        sealed: vec![4],
    };
    assert!(s.create_verifier(&v1).await.unwrap());
    assert!(!s.create_verifier(&v2).await.unwrap());
    assert_eq!(s.verifier().await.unwrap(), Some(v1));
}

/// Many writers, through several handles, each doing read → compare-and-set until it wins:
/// every increment lands exactly once.
async fn concurrent_writers<S: Store>(handles: Vec<Arc<S>>) {
    const WRITERS: usize = 8;
    const EACH: usize = 10;
    let ns = Namespace::Secrets;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let s = Arc::clone(&handles[w % handles.len()]);
        tasks.spawn(async move {
            let mut wins = 0;
            let mut conflicts = 0;
            while wins < EACH {
                let (count, expect) = match s.get(ns, "counter").await.unwrap() {
                    Some(e) => (
                        String::from_utf8(e.value)
                            .unwrap()
                            .parse::<usize>()
                            .unwrap(),
                        Expect::Revision(e.revision),
                    ),
                    None => (0, Expect::Absent),
                };
                match s
                    .put(ns, "counter", (count + 1).to_string().into_bytes(), expect)
                    .await
                    .unwrap()
                {
                    Written::Done(_) => wins += 1,
                    Written::Conflict => conflicts += 1,
                }
            }
            conflicts
        });
    }
    let conflicts: usize = common::join_all(tasks).await.into_iter().sum();
    let value = handles[0].get(ns, "counter").await.unwrap().unwrap().value;
    assert_eq!(
        String::from_utf8(value).unwrap(),
        (WRITERS * EACH).to_string()
    );
    println!(
        "concurrent writers: {} increments, {conflicts} conflicts retried",
        WRITERS * EACH
    );
}

/// Many distinct keys written concurrently: all present, listing sorted and complete.
async fn many_keys<S: Store>(handles: Vec<Arc<S>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let s = Arc::clone(&handles[i % handles.len()]);
        tasks.spawn(async move {
            s.put(
                Namespace::Policies,
                &format!("p{i:03}"),
                vec![i as u8],
                Expect::Absent,
            )
            .await
            .unwrap()
        });
    }
    for w in common::join_all(tasks).await {
        assert!(matches!(w, Written::Done(_)));
    }
    let listed: BTreeSet<String> = handles[0]
        .list(Namespace::Policies, "p")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(listed.len(), 100);
}

macro_rules! conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn basic_kv_semantics() {
                let (_guard, handles) = $make;
                basic_kv(&*handles[0]).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prefix_listing() {
                let (_guard, handles) = $make;
                listing(&*handles[0]).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn revision_reads() {
                let (_guard, handles) = $make;
                revisions(handles).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn verifier_is_create_if_absent() {
                let (_guard, handles) = $make;
                verifier(&*handles[0]).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_compare_and_set_loses_nothing() {
                let (_guard, handles) = $make;
                concurrent_writers(handles).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn snapshot_holds_every_record() {
                let (_guard, handles) = $make;
                snapshot(&*handles[0]).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_keys_concurrently() {
                let (_guard, handles) = $make;
                many_keys(handles).await;
            }
        }
    };
}

conformance!(memory, {
    let s = Arc::new(MemoryStore::default());
    ((), vec![s])
});

conformance!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    // Two independent handles on one file: separate connections, like two processes.
    let a = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    let b = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    (dir, vec![a, b])
});

/// An S3 configuration for the server `./test` starts (scripts/s3.sh), on a prefix no other
/// test uses, so tests run in parallel and runs never see each other's objects.
fn s3_config() -> spike::store::S3Config {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: the S3 conformance tests need an S3 test server; run ./test, \
                 or eval \"$(scripts/s3.sh start DIR)\" first"
            )
        })
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    spike::store::S3Config {
        endpoint: Some(var("SPIKE_TEST_S3_ENDPOINT")),
        bucket: var("SPIKE_TEST_S3_BUCKET"),
        prefix: format!(
            "conformance/{}-{nanos}-{}/",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ),
        region: var("SPIKE_TEST_S3_REGION"),
        path_style: true,
        credentials: spike::store::S3Credentials {
            access_key_id: var("SPIKE_TEST_S3_ACCESS_KEY_ID"),
            secret_access_key: var("SPIKE_TEST_S3_SECRET_ACCESS_KEY"),
            session_token: None,
        },
    }
}

conformance!(s3, {
    let cfg = s3_config();
    // Two independent clients (own connection pools) on one prefix, like two Nexus processes.
    let a = Arc::new(S3Store::open(&cfg).unwrap());
    let b = Arc::new(S3Store::open(&cfg).unwrap());
    ((), vec![a, b])
});
conformance!(postgres, {
    // A fresh database on the server `./test` started; two independent pools on it, like two
    // Nexus instances.
    let url = common::postgres::fresh_database().await;
    let a = Arc::new(PostgresStore::open(&url).await.unwrap());
    let b = Arc::new(PostgresStore::open(&url).await.unwrap());
    ((), vec![a, b])
});

/// Several instances starting at once on an empty database: the advisory lock serialises the
/// migration, every one of them opens, and they share one schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_safe_under_concurrent_starts() {
    let url = common::postgres::fresh_database().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = url.clone();
        tasks.spawn(async move { PostgresStore::open(&url).await });
    }
    let stores: Vec<_> = common::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(
        stores[0]
            .create_verifier(&Verifier {
                key_id: "k".into(),
                sealed: vec![1]
            })
            .await
            .unwrap()
    );
    for s in &stores {
        assert_eq!(s.verifier().await.unwrap().unwrap().key_id, "k");
    }
    println!(
        "postgres: {} instances migrated one database concurrently",
        stores.len()
    );
}
