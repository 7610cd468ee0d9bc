//! Authorisation as values: who the caller is ([`Caller`]), what the route asks for
//! ([`Need`]), the decision taken before the body is read ([`Access`]), and the decision for one
//! resource ([`Grant`]).
//!
//! The secret and policy operations take a [`Grant`] for the resource they touch, and only this
//! module can make one, so an operation reached without an authorisation check does not
//! compile; a grant for the wrong permission fails closed at run time.
//!
//! Order: the caller's role and the route decide first, from the handshake alone; a workload
//! then needs at least one policy that names it with the route's permission, from the policy
//! book as the store holds it in this request ([`Access::admit`], [`Policies::current`]) —
//! still before any byte of the body is read, so a caller no policy names cannot hold a
//! connection open by sending its body slowly. Once the body names the resource,
//! [`Access::grant`] decides for that resource from the same policies; no secret data is read
//! before it says yes. Only the policies that name the caller are looked at (the book remembers
//! which they are, per caller), so neither a grant nor a refusal costs more with more policies
//! for other callers.

use std::sync::Arc;

use super::book::Book;
use super::{ApiError, Keys, Nexus};
use crate::identity::{Role, SpiffeId, TrustRoots};
use crate::protocol::policy::{CIPHER_PATH, Permission, SECRET_LIST_PATH};

/// What kind of caller this is, by its SPIFFE ID alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Operators with the superuser role: everything, no policies.
    Superuser,
    /// SPIKE's "lite" workloads: the cipher only.
    Lite,
    /// Everyone else in the trust domain: what policies grant.
    Workload,
    /// Nexus, Keeper, recover and restore identities: no secrets, policies or cipher.
    Refused,
}

impl Caller {
    /// Classifies `id` by the trust domains each role may come from (`SPIKE_TRUST_ROOT*`).
    pub fn of(id: &SpiffeId, trust: &TrustRoots) -> Caller {
        match trust.role_of(id) {
            Some(Role::Superuser) => Caller::Superuser,
            // SPIKE_TRUST_ROOT_LITE_WORKLOAD decides, as in SPIKE.
            Some(Role::Workload) if trust.is_lite_workload(id) => Caller::Lite,
            Some(Role::Workload) => Caller::Workload,
            _ => Caller::Refused,
        }
    }
}

/// What a route asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A permission on a resource named in the body (or a reserved pseudo-path).
    Permission(Permission),
    /// An operator role, whatever the policies say (recover, restore).
    Role(Role),
}

/// The decision taken before the body is read: this caller may go on with this route. For a
/// workload it carries the policy book it was decided on and the policies in it that name the
/// caller with the route's permission.
pub struct Access<'a> {
    caller: &'a SpiffeId,
    kind: Caller,
    want: Permission,
    /// The book, and the indices in it of the policies naming the caller with `want`
    /// (workloads only).
    policies: Option<(Arc<Book>, Vec<usize>)>,
}

impl<'a> Access<'a> {
    /// Decides whether `caller` may use a route that needs `want`, before reading its body.
    pub async fn admit(
        nexus: &Arc<Nexus>,
        keys: &Keys,
        caller: &'a SpiffeId,
        trust: &TrustRoots,
        want: Permission,
    ) -> Result<Access<'a>, ApiError> {
        let kind = Caller::of(caller, trust);
        let mut access = Access {
            caller,
            kind,
            want,
            policies: None,
        };
        match kind {
            Caller::Superuser => Ok(access),
            Caller::Lite if want == Permission::Execute => Ok(access),
            Caller::Lite | Caller::Refused => Err(ApiError::Unauthorized),
            Caller::Workload => {
                // Through Nexus: a keyring re-wrapped by a rekey is followed, not refused.
                let ring = nexus.keyring(keys).await?;
                let book = nexus.policies.current(&nexus.store, &*ring).await?;
                let granting: Vec<usize> = book
                    .naming(caller)
                    .iter()
                    .copied()
                    .filter(|&i| book.rule(i).is_some_and(|r| r.grants(&[want])))
                    .collect();
                let refused = granting.is_empty();
                access.policies = Some((book, granting));
                if refused {
                    tracing::info!(caller = %caller, want = want.as_str(), "no policy names this caller");
                    return Err(ApiError::Unauthorized);
                }
                Ok(access)
            }
        }
    }

    /// Decides for one resource: the caller may do this access's permission on `resource`.
    pub fn grant(&self, resource: &str) -> Result<Grant, ApiError> {
        let allowed = match self.kind {
            Caller::Superuser => true,
            Caller::Lite => resource == CIPHER_PATH && self.want == Permission::Execute,
            Caller::Workload => self.reaches(resource),
            Caller::Refused => false,
        };
        if allowed {
            Ok(Grant {
                resource: resource.to_string(),
                permission: self.want,
            })
        } else {
            tracing::info!(caller = %self.caller, want = self.want.as_str(), "no policy grants this resource");
            Err(ApiError::Unauthorized)
        }
    }

    /// Whether one of the workload's granting policies reaches `path`.
    fn reaches(&self, path: &str) -> bool {
        self.policies.as_ref().is_some_and(|(book, granting)| {
            granting
                .iter()
                .any(|&i| book.rule(i).is_some_and(|r| r.reaches(path)))
        })
    }

    /// The grant to list secrets: every path when the caller may list `spike/system/secret`
    /// (SPIKE's rule), otherwise only the paths some policy grants it `list` on
    /// ([`Listing::keep`]).
    pub fn listing(&self) -> Result<Listing<'_>, ApiError> {
        if self.want != Permission::List {
            return Err(ApiError::Internal("a listing needs a list access".into()));
        }
        Ok(Listing {
            all: self.grant(SECRET_LIST_PATH).is_ok(),
            access: self,
        })
    }
}

/// Permission to list secret paths, decided before any key is read.
pub struct Listing<'a> {
    all: bool,
    access: &'a Access<'a>,
}

impl Listing<'_> {
    /// Whether `path` may appear in the caller's listing.
    pub fn keep(&self, path: &str) -> bool {
        // The access was admitted for `list` (checked in `listing`), so its granting policies
        // are those that name the caller with `list`.
        self.all || self.access.reaches(path)
    }
}

/// Permission for one operation on one resource. Only [`Access::grant`] makes one.
#[derive(Debug)]
pub struct Grant {
    resource: String,
    permission: Permission,
}

impl Grant {
    /// The resource this grant is for, if it grants `want`; an operation asks with the
    /// permission it needs, so a grant for another permission fails closed.
    pub fn resource(&self, want: Permission) -> Result<&str, ApiError> {
        if self.permission == want {
            Ok(&self.resource)
        } else {
            Err(ApiError::Internal(format!(
                "a {} grant was used for a {} operation",
                self.permission.as_str(),
                want.as_str()
            )))
        }
    }

    /// A grant without a policy check, for unit tests of the operations.
    #[cfg(test)]
    pub fn for_tests(resource: &str, permission: Permission) -> Grant {
        Grant {
            resource: resource.to_string(),
            permission,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_kinds() {
        let trust = TrustRoots::single("spike.ist").unwrap();
        let k = |s: &str| Caller::of(&SpiffeId::parse(s).unwrap(), &trust);
        assert_eq!(
            k("spiffe://spike.ist/spike/pilot/role/superuser"),
            Caller::Superuser
        );
        assert_eq!(
            k("spiffe://spike.ist/spike/workload/role/lite"),
            Caller::Lite
        );
        assert_eq!(k("spiffe://spike.ist/app/web"), Caller::Workload);
        assert_eq!(k("spiffe://spike.ist/spike/keeper/1"), Caller::Refused);
        assert_eq!(k("spiffe://spike.ist/spike/nexus"), Caller::Refused);
        assert_eq!(
            k("spiffe://spike.ist/spike/pilot/role/recover"),
            Caller::Refused
        );
        assert_eq!(k("spiffe://other.org/app/web"), Caller::Refused);
    }

    #[test]
    fn a_grant_serves_only_its_permission() {
        let g = Grant::for_tests("secrets/a", Permission::Read);
        assert_eq!(g.resource(Permission::Read).unwrap(), "secrets/a");
        assert!(g.resource(Permission::Write).is_err());
    }
}
