//! Policies: who (a SPIFFE-ID pattern) may do what (permissions) where (a path pattern), with
//! SPIKE's semantics (DESIGN.md §4, reference §6.2–6.3).
//!
//! - Patterns are regular expressions matched anywhere in the string unless anchored
//!   (`^...$`), compiled with a size limit. Compiled forms are memoised by their source text;
//!   that is a pure function of the text, not a cache of state: every check reads every policy
//!   from the store.
//! - Permissions: `read`, `write`, `list`, `execute`, `super` (everything). A policy grants a
//!   request when both patterns match and it holds every wanted permission (or `super`); there
//!   are no deny rules.
//! - The reserved pseudo-paths `spike/system/acl` (policy management), `spike/system/secret`
//!   (listing) and `spike/system/cipher/exec` (the cipher) are reachable only by a policy whose
//!   path pattern matches them as a whole (`^(?:pattern)$`) and whose SPIFFE-ID pattern is
//!   anchored or a deliberate catch-all. Policies that would reach them by substring accident
//!   are refused at creation and ignored at check time.
//!
//! Stored sealed in [`Namespace::Policies`] under the policy name, with the name as associated
//! data.

use serde::{Deserialize, Serialize};

use super::ApiError;
use super::authz::Grant;
use crate::crypto::AeadKey;
use crate::identity::SpiffeId;
use crate::protocol::nexus::{self as wire, Policy, PolicyPutRequest};
use crate::protocol::policy::{self as rules, compile, reserved_ok};
pub use crate::protocol::policy::{ACL_PATH, CIPHER_PATH, Permission, SECRET_LIST_PATH};
use crate::store::{Expect, Namespace, Store, Written};

/// A policy as stored (inside the sealed value).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// The policy's name, its identifier.
    pub name: String,
    /// Regular expression over callers' SPIFFE IDs.
    pub spiffeid_pattern: String,
    /// Regular expression over secret paths.
    pub path_pattern: String,
    /// What it grants.
    pub permissions: Vec<Permission>,
    /// Creation time (Unix nanoseconds).
    pub created: i64,
    /// Last replacement time (Unix nanoseconds).
    pub updated: i64,
}

impl StoredPolicy {
    /// The policy as the API returns it.
    pub fn to_api(&self) -> Policy {
        Policy {
            // SPIKE leaves `id` empty; ours is the name, so a listed policy can be fetched
            // by the `id` it was listed with.
            id: self.name.clone(),
            name: self.name.clone(),
            spiffeid_pattern: self.spiffeid_pattern.clone(),
            path_pattern: self.path_pattern.clone(),
            permissions: self
                .permissions
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            created_at: wire::rfc3339(self.created),
            updated_at: wire::rfc3339(self.updated),
        }
    }
}

fn aad(name: &str) -> Vec<u8> {
    format!("spike/policy/v1\0{name}").into_bytes()
}

/// Validates a policy from a request ([`rules::validate`]) and returns its stored form (times
/// set by the caller).
pub fn validate(req: &PolicyPutRequest) -> Result<StoredPolicy, ApiError> {
    let permissions = rules::validate(req).map_err(ApiError::BadRequest)?;
    Ok(StoredPolicy {
        name: req.name.clone(),
        spiffeid_pattern: req.spiffeid_pattern.clone(),
        path_pattern: req.path_pattern.clone(),
        permissions,
        created: 0,
        updated: 0,
    })
}

/// Policy management is authorised on the reserved [`ACL_PATH`]: refuses a grant for anything
/// else or for another permission.
fn granted(grant: &Grant, want: Permission) -> Result<(), ApiError> {
    if grant.resource(want)? == ACL_PATH {
        Ok(())
    } else {
        Err(ApiError::Internal(
            "a policy operation needs a grant on the ACL path".into(),
        ))
    }
}

/// Creates or replaces a policy (keeping its creation time).
pub async fn put(
    store: &impl Store,
    key: &AeadKey,
    grant: &Grant,
    req: &PolicyPutRequest,
) -> Result<(), ApiError> {
    granted(grant, Permission::Write)?;
    let mut policy = validate(req)?;
    for _ in 0..50 {
        let existing = store.get(Namespace::Policies, &policy.name).await?;
        let now = wire::now_nanos();
        let (created, expect) = match &existing {
            Some(entry) => (
                open(key, &policy.name, &entry.value)
                    .map(|p| p.created)
                    .unwrap_or(now),
                Expect::Revision(entry.revision.clone()),
            ),
            None => (now, Expect::Absent),
        };
        policy.created = created;
        policy.updated = now;
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(&policy).map_err(|e| ApiError::Internal(e.to_string()))?,
        );
        let sealed = key.seal(&aad(&policy.name), &plain)?;
        if let Written::Done(_) = store
            .put(Namespace::Policies, &policy.name, sealed, expect)
            .await?
        {
            return Ok(());
        }
    }
    Err(ApiError::Contended)
}

fn open(key: &AeadKey, name: &str, sealed: &[u8]) -> Result<StoredPolicy, ApiError> {
    let plain = key.open(&aad(name), sealed).map_err(|_| {
        ApiError::Internal(format!("policy {name:?} does not open under this root key"))
    })?;
    serde_json::from_slice(&plain)
        .map_err(|e| ApiError::Internal(format!("policy {name:?} is malformed: {e}")))
}

/// Reads one policy (read on the ACL path).
pub async fn get(
    store: &impl Store,
    key: &AeadKey,
    grant: &Grant,
    name: &str,
) -> Result<StoredPolicy, ApiError> {
    granted(grant, Permission::Read)?;
    rules::validate_name(name).map_err(ApiError::BadRequest)?;
    let entry = store
        .get(Namespace::Policies, name)
        .await?
        .ok_or(ApiError::NotFound)?;
    open(key, name, &entry.value)
}

/// Deletes one policy (write on the ACL path).
pub async fn delete(store: &impl Store, grant: &Grant, name: &str) -> Result<(), ApiError> {
    granted(grant, Permission::Write)?;
    rules::validate_name(name).map_err(ApiError::BadRequest)?;
    for _ in 0..50 {
        let entry = store
            .get(Namespace::Policies, name)
            .await?
            .ok_or(ApiError::NotFound)?;
        if store
            .delete(Namespace::Policies, name, &entry.revision)
            .await?
        {
            return Ok(());
        }
    }
    Err(ApiError::Contended)
}

/// Every policy, read from the store now. A policy that does not open is skipped and logged
/// (one bad row must not lock everyone out).
pub async fn all(
    store: &impl Store,
    key: &AeadKey,
    grant: &Grant,
) -> Result<Vec<StoredPolicy>, ApiError> {
    granted(grant, Permission::List)?;
    Ok(open_all(key, store.scan(Namespace::Policies).await?))
}

/// Opens the rows of a scan of [`Namespace::Policies`], skipping (and logging) any that do not
/// open.
pub fn open_all(key: &AeadKey, rows: Vec<(String, Vec<u8>)>) -> Vec<StoredPolicy> {
    rows.into_iter()
        .filter_map(|(name, sealed)| match open(key, &name, &sealed) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!(policy = %name, error = %e, "ignoring a policy that does not open");
                None
            }
        })
        .collect()
}

/// Does `policy` apply to `caller` on `path` (patterns and the reserved-path rule)?
pub fn applies(policy: &StoredPolicy, caller: &SpiffeId, path: &str) -> bool {
    let (Ok(id_re), Ok(path_re)) = (
        compile(&policy.spiffeid_pattern),
        compile(&policy.path_pattern),
    ) else {
        return false;
    };
    id_re.is_match(caller.as_str())
        && path_re.is_match(path)
        && reserved_ok(&policy.spiffeid_pattern, &policy.path_pattern, path)
}

/// Does `policy`'s SPIFFE-ID pattern name `caller`?
pub fn names(policy: &StoredPolicy, caller: &SpiffeId) -> bool {
    compile(&policy.spiffeid_pattern).is_ok_and(|re| re.is_match(caller.as_str()))
}

/// Does `policy` hold every permission in `want`?
pub fn grants(policy: &StoredPolicy, want: &[Permission]) -> bool {
    policy.permissions.contains(&Permission::Super)
        || want.iter().all(|w| policy.permissions.contains(w))
}

/// Whether any of `policies` lets `caller` do `want` on `path`.
pub fn allowed(
    policies: &[StoredPolicy],
    caller: &SpiffeId,
    path: &str,
    want: &[Permission],
) -> bool {
    policies
        .iter()
        .any(|p| applies(p, caller, path) && grants(p, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, path: &str, perms: &[&str]) -> PolicyPutRequest {
        PolicyPutRequest {
            name: "p".into(),
            spiffeid_pattern: id.into(),
            path_pattern: path.into(),
            permissions: perms.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn substring_semantics_unless_anchored() {
        let p = validate(&req("spiffe://spike.ist/web", "secrets/web", &["read"])).unwrap();
        let web = id("spiffe://spike.ist/web");
        assert!(allowed(
            std::slice::from_ref(&p),
            &web,
            "secrets/web/db",
            &[Permission::Read]
        ));
        assert!(allowed(
            std::slice::from_ref(&p),
            &web,
            "x/secrets/web",
            &[Permission::Read]
        ));
        assert!(!allowed(
            std::slice::from_ref(&p),
            &web,
            "secrets/web/db",
            &[Permission::Write]
        ));
        assert!(allowed(
            std::slice::from_ref(&p),
            &id("spiffe://spike.ist/webby"),
            "secrets/web",
            &[Permission::Read]
        ));
        let anchored = validate(&req(
            "^spiffe://spike.ist/web$",
            "^secrets/web/[^/]+$",
            &["read", "write"],
        ))
        .unwrap();
        assert!(allowed(
            std::slice::from_ref(&anchored),
            &web,
            "secrets/web/db",
            &[Permission::Read, Permission::Write]
        ));
        assert!(!allowed(
            std::slice::from_ref(&anchored),
            &web,
            "secrets/web/db/x",
            &[Permission::Read]
        ));
        assert!(!allowed(
            &[anchored],
            &id("spiffe://spike.ist/webby"),
            "secrets/web/db",
            &[Permission::Read]
        ));
        let sup = validate(&req("^spiffe://spike.ist/admin$", ".*", &["super"])).unwrap();
        assert!(allowed(
            &[sup],
            &id("spiffe://spike.ist/admin"),
            "anything",
            &[Permission::Write, Permission::List]
        ));
    }

    #[test]
    fn reserved_paths_need_whole_match_and_an_anchored_id() {
        // Substring accidents are refused at creation...
        for (i, p) in [
            ("spiffe://spike.ist/w", "acl"),
            ("spiffe://spike.ist/w", "system"),
            ("^spiffe://spike.ist/w$", "spike"),
            ("spiffe://spike.ist/w", ".*"),
        ] {
            let err = validate(&req(i, p, &["write"])).unwrap_err().to_string();
            assert!(err.contains("reserved path"), "{i} {p}: {err}");
        }
        // ...deliberate grants are allowed.
        let ok = validate(&req(
            "^spiffe://spike.ist/ops$",
            "^spike/system/acl$",
            &["write"],
        ))
        .unwrap();
        assert!(allowed(
            std::slice::from_ref(&ok),
            &id("spiffe://spike.ist/ops"),
            ACL_PATH,
            &[Permission::Write]
        ));
        assert!(!allowed(
            &[ok],
            &id("spiffe://spike.ist/ops"),
            SECRET_LIST_PATH,
            &[Permission::Write]
        ));
        let all = validate(&req("spiffe://.*", ".*", &["list"])).unwrap();
        assert!(allowed(
            &[all],
            &id("spiffe://spike.ist/x"),
            SECRET_LIST_PATH,
            &[Permission::List]
        ));
        // A stored policy that slipped through (written by an older version) is ignored for
        // reserved paths.
        let sneaky = StoredPolicy {
            name: "s".into(),
            spiffeid_pattern: "spiffe://spike.ist/w".into(),
            path_pattern: "acl".into(),
            permissions: vec![Permission::Super],
            created: 0,
            updated: 0,
        };
        assert!(!allowed(
            &[sneaky],
            &id("spiffe://spike.ist/w"),
            ACL_PATH,
            &[Permission::Write]
        ));
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let cases = [
            req("spiffe://spike.ist/(", "x", &["read"]),
            req("spiffe://spike.ist/w", "a(", &["read"]),
            req("http://x", "x", &["read"]),
            req("spiffe://spike.ist/w", "x", &[]),
            req("spiffe://spike.ist/w", "x", &["admin"]),
            req("spiffe://spike.ist/w", "a b", &["read"]),
            req("spiffe://spike.ist/w", "(a{1000}){1000}", &["read"]),
        ];
        for r in cases {
            let e = validate(&r).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{r:?}");
        }
        let mut r = req("spiffe://spike.ist/w", "x", &["read"]);
        r.name = "bad/name".into();
        assert!(validate(&r).is_err());
    }
}
