#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The SPIRE test peers themselves, no SPIKE process: each registered identity gets exactly its
//! SVID from the real agent, so the uid selectors of scripts/spire.sh tell the workloads apart.
//! Skipped (with a note) without the SPIRE that ./test starts, unless CI or SPIKE_REQUIRE_SPIRE
//! is set.

// Only the SPIRE helper: it is std-only, and this test needs none of the cluster harness.
#[path = "common/spire.rs"]
mod spire;

use spire::{Spire, fresh_uid};

#[test]
fn each_registered_identity_gets_exactly_its_svid() {
    let Some(spire) = Spire::shared() else { return };
    let ids = spire.identities();
    let want = [
        ("nexus", Some("/spike/nexus")),
        ("keeper-1", Some("/spike/keeper")),
        ("keeper-2", Some("/spike/keeper")),
        ("keeper-3", Some("/spike/keeper")),
        ("superuser", Some("/spike/pilot/role/superuser")),
        ("recover", Some("/spike/pilot/role/recover")),
        ("restore", Some("/spike/pilot/role/restore")),
        ("app-one", Some("/app/one")),
        ("app-two", Some("/app/two")),
        ("unregistered", None),
    ];
    assert_eq!(
        ids.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        want.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    for (identity, (_, path)) in ids.iter().zip(want) {
        let expected = path.map(|p| spire.id(p));
        assert_eq!(identity.spiffe_id, expected, "{identity:?}");
        let got = spire.fetch_x509(identity.uid);
        match expected {
            Some(id) => assert_eq!(got, Ok(vec![id]), "{identity:?}"),
            None => assert!(
                got.as_ref().is_err_and(|e| e.contains("PermissionDenied")),
                "{identity:?}: {got:?}"
            ),
        }
    }
    // The test itself runs as root, which no entry selects.
    let out = std::process::Command::new(&spire.agent_bin)
        .args(["api", "fetch", "x509", "-socketPath"])
        .arg(&spire.socket)
        .output()
        .unwrap();
    assert!(!out.status.success(), "root was served an SVID");
}

#[test]
fn command_as_runs_under_the_uid_with_the_socket_set() {
    let Some(spire) = Spire::shared() else { return };
    let uid = spire.uid("keeper-2");
    let out = spire
        .command_as(uid, "/bin/sh")
        .args(["-c", "id -u; echo \"$SPIFFE_ENDPOINT_SOCKET\""])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{uid}\n{}\n", spire.endpoint())
    );
}

#[test]
fn an_entry_is_served_once_created_and_refused_once_deleted() {
    let Some(spire) = Spire::shared() else { return };
    let uid = fresh_uid();
    let id = spire.id(&format!("/app/smoke-{uid}"));
    assert!(spire.fetch_x509(uid).is_err());
    let entry = spire.create_entry(uid, &id, &["-x509SVIDTTL", "120"]);
    spire.wait_for_svid(uid, &id);
    spire.delete_entry(&entry);
    spire.wait_for_no_svid(uid);
}

#[test]
fn the_other_trust_domain_serves_its_own_ids() {
    let Some(other) = Spire::other() else { return };
    assert_ne!(other.trust_domain, "spike.ist");
    let uid = other.uid("app-one");
    assert_eq!(
        other.fetch_x509(uid),
        Ok(vec![format!("spiffe://{}/app/one", other.trust_domain)])
    );
}
