#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! One conformance suite for the `Store` trait, run against every backend. A backend passes
//! when it gives exactly the semantics Nexus relies on: conditional writes that never let two
//! writers both win, revisions that change on every write and can be read alone, sorted prefix
//! listing, create-if-absent for the root-key verifier, and all of it across independent
//! handles on one store (two handles on one SQLite file behave like two processes).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::s3::{Kind, S3Server};
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
    // `b` before `b/1`: SeaweedFS cannot create an object named like an existing "directory"
    // (see `seaweedfs_refuses_a_key_that_has_keys_under_it`); the order changes nothing else.
    for k in ["b", "b/2", "a/1", "b/1", "c%", "c_x", "ba"] {
        assert!(matches!(
            s.put(ns, k, vec![1], Expect::Absent).await.unwrap(),
            Written::Done(_)
        ));
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

conformance!(s3, {
    // Two independent clients (own connection pools) on one prefix, like two Nexus processes,
    // on the moto server `./test` starts.
    let cfg = common::s3::shared_config(Kind::Moto, "conformance");
    let a = Arc::new(S3Store::open(&cfg).unwrap());
    let b = Arc::new(S3Store::open(&cfg).unwrap());
    ((), vec![a, b])
});
conformance!(s3_seaweedfs, {
    // The same on SeaweedFS, a real object store (scripts/seaweedfs.sh).
    if !Kind::SeaweedFs.available() {
        return;
    }
    let cfg = common::s3::shared_config(Kind::SeaweedFs, "conformance");
    let a = Arc::new(S3Store::open(&cfg).unwrap());
    let b = Arc::new(S3Store::open(&cfg).unwrap());
    ((), vec![a, b])
});

/// A limit of SeaweedFS, pinned so a change is noticed: its filer is a file system, so once
/// `x/1` exists, `x` is a directory and creating an object `x` fails its `If-None-Match: *`
/// (412) although reading `x` says it does not exist. The store reports a conflict and changes
/// nothing; through Nexus, a secret path cannot be created after a longer path under it (the
/// write gives 503 after its retries, nothing is lost). The other order works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_refuses_a_key_that_has_keys_under_it() {
    if !Kind::SeaweedFs.available() {
        return;
    }
    let cfg = common::s3::shared_config(Kind::SeaweedFs, "directories");
    let s = S3Store::open(&cfg).unwrap();
    let ns = Namespace::Secrets;
    assert!(matches!(
        s.put(ns, "x/1", b"one".to_vec(), Expect::Absent)
            .await
            .unwrap(),
        Written::Done(_)
    ));
    assert_eq!(
        s.put(ns, "x", b"x".to_vec(), Expect::Absent).await.unwrap(),
        Written::Conflict
    );
    assert!(s.get(ns, "x").await.unwrap().is_none());
    assert_eq!(s.get(ns, "x/1").await.unwrap().unwrap().value, b"one");
    assert_eq!(s.list(ns, "").await.unwrap(), vec!["x/1"]);
    // The other order: both exist.
    for k in ["y", "y/1"] {
        assert!(matches!(
            s.put(ns, k, k.as_bytes().to_vec(), Expect::Absent)
                .await
                .unwrap(),
            Written::Done(_)
        ));
    }
    assert_eq!(s.list(ns, "y").await.unwrap(), vec!["y", "y/1"]);
}

/// The start-time probe passes on a server that honours conditional writes, says what it found,
/// and leaves nothing behind.
async fn probe_passes(kind: Kind) {
    let cfg = common::s3::shared_config(kind, "probe");
    let store = S3Store::open(&cfg).unwrap();
    let found = store.check_conditional_writes().await.unwrap();
    println!(
        "{kind:?}: If-None-Match: * and If-Match on PutObject honoured; If-Match on DeleteObject \
         honoured: {}",
        found.delete_if_match
    );
    assert_eq!(
        common::s3::objects_under_prefix(&cfg).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_probe_passes_on_moto() {
    probe_passes(Kind::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_probe_passes_on_seaweedfs() {
    if Kind::SeaweedFs.available() {
        probe_passes(Kind::SeaweedFs).await;
    }
}

/// A server that ignores If-Match and If-None-Match: the probe refuses it with a message that
/// says what it ignored, and nothing is left under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_probe_refuses_a_server_that_ignores_conditional_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start_kind(Kind::IgnoresConditions, &dir.path().join("s3"));
    let cfg = server.config("refused/");
    let store = S3Store::open(&cfg).unwrap();
    let err = store.check_conditional_writes().await.unwrap_err();
    assert!(
        matches!(err, spike::store::Error::Incompatible { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("If-None-Match: *"), "{text}");
    assert!(!text.contains(&cfg.credentials.secret_access_key), "{text}");
    println!("refused: {text}");
    assert_eq!(
        common::s3::objects_under_prefix(&cfg).await,
        Vec::<String>::new()
    );
    // The same server does lose updates: a second create-if-absent overwrites the first.
    let ns = Namespace::Secrets;
    assert!(matches!(
        store
            .put(ns, "k", b"one".to_vec(), Expect::Absent)
            .await
            .unwrap(),
        Written::Done(_)
    ));
    assert!(matches!(
        store
            .put(ns, "k", b"two".to_vec(), Expect::Absent)
            .await
            .unwrap(),
        Written::Done(_)
    ));
}

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
