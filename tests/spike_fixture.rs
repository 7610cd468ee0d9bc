#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The SPIKE main fixture (tests/fixtures/spike-main/): a Nexus SQLite store written by SPIKE's
//! own Nexus and the recovery files its own Pilot wrote. The product's reader of SPIKE stores
//! (`spike::migrate::spike_db`, what `spike migrate from-spike` uses) decrypts every row with the
//! key the recovery files rebuild, and the result is checked against expected.json (which an
//! independent decoder wrote and SPIKE's own answers confirmed), so the fixture's README is a
//! tested spec of that reader.

use std::path::Path;

use serde_json::Value;
use spike::crypto::{RootKey, combine, decode_recovery_shard};
use spike::migrate::spike_db::{SpikeDb, parse_go_time};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spike-main");

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(DIR).join("expected.json")).unwrap())
        .unwrap()
}

/// The root key, from SPIKE's recovery files `a` and `b` (any two will do).
fn root_key(a: u8, b: u8) -> RootKey {
    let shards: Vec<_> = [a, b]
        .iter()
        .map(|i| {
            let path = Path::new(DIR).join(format!("recover/spike.recovery.{i}.txt"));
            decode_recovery_shard(&std::fs::read_to_string(path).unwrap()).unwrap()
        })
        .collect();
    combine(&shards).unwrap()
}

#[test]
fn spike_main_store_decrypts_as_documented() {
    let want = expected();
    let root = root_key(1, 3);
    let hex: String = root.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(want["root_key"], hex.as_str());
    for (a, b) in [(1, 2), (2, 3)] {
        assert!(root_key(a, b).ct_eq(&root));
    }

    let db = SpikeDb::open(&Path::new(DIR).join("spike.db")).unwrap();
    let probe = db.probe().unwrap().unwrap();
    assert!(SpikeDb::opens(&probe, &root));
    assert!(!SpikeDb::opens(&probe, &RootKey::generate().unwrap()));
    let got = db.read(&root).unwrap();

    let want_secrets = want["secrets"].as_object().unwrap();
    assert_eq!(
        got.secrets.keys().collect::<Vec<_>>(),
        want_secrets.keys().collect::<Vec<_>>()
    );
    for (path, secret) in &got.secrets {
        let w = &want_secrets[path];
        let m = &w["metadata"];
        assert_eq!(
            secret.current,
            m["current_version"].as_u64().unwrap(),
            "{path}"
        );
        assert_eq!(
            secret.created,
            m["created_time"].as_i64().unwrap() * 1_000_000_000
        );
        assert_eq!(
            secret.updated,
            m["updated_time"].as_i64().unwrap() * 1_000_000_000
        );
        let wv = w["versions"].as_array().unwrap();
        assert_eq!(secret.versions.len(), wv.len(), "{path}");
        for ((n, v), exp) in secret.versions.iter().zip(wv) {
            assert_eq!(*n, exp["version"].as_u64().unwrap(), "{path}");
            assert_eq!(
                serde_json::to_value(&v.values).unwrap(),
                exp["data"],
                "{path} v{n}"
            );
            assert_eq!(
                Some(v.created),
                parse_go_time(exp["created_time"].as_str().unwrap())
            );
            assert_eq!(
                v.deleted,
                exp["deleted_time"]
                    .as_str()
                    .map(|t| parse_go_time(t).unwrap()),
                "{path} v{n}"
            );
            // What SPIKE served is exactly the versions not deleted.
            assert_eq!(v.deleted.is_none(), exp["served_by_spike"] == true);
        }
    }
    // The cases the README points at.
    assert_eq!(got.secrets["app/rotating"].versions.len(), 6);
    assert_eq!(got.secrets["app/retired/legacy"].current, 0);
    assert!(
        got.secrets["app/db/credentials"].versions[&2]
            .deleted
            .is_some()
    );
    assert_eq!(
        got.secrets["shared/config.v1"].versions[&1].values["motd"],
        "héllo wörld ✓ \"quoted\"\nsecond line"
    );

    let want_policies = want["policies"].as_object().unwrap();
    assert_eq!(
        got.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
        want_policies.keys().collect::<Vec<_>>()
    );
    for p in &got.policies {
        let w = &want_policies[&p.name];
        assert_eq!(w["spiffe_id_pattern"], p.spiffeid_pattern.as_str());
        assert_eq!(w["path_pattern"], p.path_pattern.as_str());
        assert_eq!(w["permissions"], serde_json::json!(p.permissions));
        assert_eq!(w["created_time"], p.created);
        assert_eq!(w["updated_time"], p.updated);
    }
    assert!(!got.policies.iter().any(|p| p.name == "temp"));
}
