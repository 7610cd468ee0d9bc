//! Trust domains as SPIKE configures them, and which peer may hold which role.
//!
//! SPIKE recognises each role's SPIFFE ID in a list of trust domains of its own
//! (spike-sdk-go `spiffeid/auth.go`, `config/env/trust.go`):
//!
//! | variable | constrains the trust domain of | who checks it |
//! |---|---|---|
//! | `SPIKE_TRUST_ROOT_NEXUS` | Nexus peers (`/spike/nexus[/...]`) | Keepers (their callers), clients (the server they reach) |
//! | `SPIKE_TRUST_ROOT_KEEPER` | Keeper peers (`/spike/keeper[/...]`) | Nexus, when it calls Keepers |
//! | `SPIKE_TRUST_ROOT_PILOT` | operators (`/spike/pilot/role/{superuser,recover,restore}[/...]`) | Nexus |
//! | `SPIKE_TRUST_ROOT_LITE_WORKLOAD` | lite workloads (`/spike/workload/role/lite[/...]`) | Nexus |
//! | `SPIKE_TRUST_ROOT` | every other workload (authorised by policies only) | Nexus |
//!
//! Each holds one trust domain or a comma-separated list. An ID is a role's ID
//! only if its trust domain is in that role's list: with
//! `SPIKE_TRUST_ROOT_NEXUS=a.org`, `spiffe://b.org/spike/nexus` is no Nexus.
//!
//! Differences from SPIKE, decided here:
//! - SPIKE defaults every role variable to `spike.ist` on its own and only logs
//!   `SPIKE_TRUST_ROOT`. Here an unset role variable falls back to the first
//!   (primary) `SPIKE_TRUST_ROOT` domain (itself `spike.ist` by default), so
//!   one variable is enough for a single trust domain, and `SPIKE_TRUST_ROOT`
//!   decides whose workloads Nexus serves (SPIKE lets any SVID its bundles
//!   verify through). Listing a federated domain there admits its workloads,
//!   to be authorised by policies, and never a role: a federated domain's
//!   `/spike/pilot/role/superuser` is an ordinary workload unless
//!   `SPIKE_TRUST_ROOT_PILOT` names that domain.
//! - A listed value that is not a valid trust domain name (an empty entry, a
//!   `spiffe://` prefix, upper case) is refused at start with the variable's
//!   name, where SPIKE silently matches nothing.
//! - `SPIKE_TRUST_ROOT_BOOTSTRAP` is not read: there is no bootstrap role
//!   (Nexus creates the root key itself, DESIGN.md §1.4).
//!
//! Trust bundles follow the same lists: a bundle (the agent's own or a
//! federated one) is used only for a trust domain listed in one of these
//! variables, and a peer's chain is checked only against the bundle of the
//! trust domain in its own SPIFFE ID (see `tls.rs`).

use std::fmt;

use super::spiffe::{Role, SpiffeId, check_trust_domain};
use super::{Error, Result};

/// `SPIKE_TRUST_ROOT`
pub const TRUST_ROOT: &str = "SPIKE_TRUST_ROOT";
/// `SPIKE_TRUST_ROOT_NEXUS`
pub const TRUST_ROOT_NEXUS: &str = "SPIKE_TRUST_ROOT_NEXUS";
/// `SPIKE_TRUST_ROOT_KEEPER`
pub const TRUST_ROOT_KEEPER: &str = "SPIKE_TRUST_ROOT_KEEPER";
/// `SPIKE_TRUST_ROOT_PILOT`
pub const TRUST_ROOT_PILOT: &str = "SPIKE_TRUST_ROOT_PILOT";
/// `SPIKE_TRUST_ROOT_LITE_WORKLOAD`
pub const TRUST_ROOT_LITE_WORKLOAD: &str = "SPIKE_TRUST_ROOT_LITE_WORKLOAD";

/// The trust domain used when `SPIKE_TRUST_ROOT` is unset (SPIKE's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "spike.ist";

const LITE_PATH: &str = "/spike/workload/role/lite";

/// The trust domains each kind of peer may come from. Every list is non-empty,
/// validated and free of duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustRoots {
    /// `SPIKE_TRUST_ROOT`: workloads; the first entry is the "primary" domain.
    general: Vec<String>,
    /// `SPIKE_TRUST_ROOT_NEXUS`
    nexus: Vec<String>,
    /// `SPIKE_TRUST_ROOT_KEEPER`
    keeper: Vec<String>,
    /// `SPIKE_TRUST_ROOT_PILOT`: superuser, recover and restore operators.
    pilot: Vec<String>,
    /// `SPIKE_TRUST_ROOT_LITE_WORKLOAD`
    lite_workload: Vec<String>,
}

/// Parses one variable's comma-separated list of trust domains.
pub(super) fn parse_list(var: &'static str, value: &str) -> Result<Vec<String>> {
    let bad = |reason: String| Error::InvalidTrustRoot {
        var,
        value: value.to_string(),
        reason,
    };
    let mut out: Vec<String> = Vec::new();
    for entry in value.split(',') {
        let td = entry.trim();
        if td.is_empty() {
            return Err(bad("empty entry in the comma-separated list".into()));
        }
        if let Some(rest) = td.strip_prefix("spiffe://") {
            return Err(bad(format!(
                "give the trust domain name ({rest:?}), not a spiffe:// ID"
            )));
        }
        check_trust_domain(td).map_err(|r| bad(format!("{td:?}: {r}")))?;
        if !out.iter().any(|d| d == td) {
            out.push(td.to_string());
        }
    }
    Ok(out)
}

impl TrustRoots {
    /// Reads the five variables through `get` (which returns `None` for unset
    /// or empty ones). Unset role variables take the first (primary)
    /// `SPIKE_TRUST_ROOT` domain; unset `SPIKE_TRUST_ROOT` is `spike.ist`.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<TrustRoots> {
        let general = match get(TRUST_ROOT) {
            Some(v) => parse_list(TRUST_ROOT, &v)?,
            None => vec![DEFAULT_TRUST_DOMAIN.to_string()],
        };
        // Roles stay in the primary domain unless their variable says otherwise: workloads
        // of the other listed (federated) domains get no role by default.
        let primary = general[..1].to_vec();
        let role = |var: &'static str| -> Result<Vec<String>> {
            match get(var) {
                Some(v) => parse_list(var, &v),
                None => Ok(primary.clone()),
            }
        };
        Ok(TrustRoots {
            nexus: role(TRUST_ROOT_NEXUS)?,
            keeper: role(TRUST_ROOT_KEEPER)?,
            pilot: role(TRUST_ROOT_PILOT)?,
            lite_workload: role(TRUST_ROOT_LITE_WORKLOAD)?,
            general,
        })
    }

    /// Every role in one trust domain: what `SPIKE_TRUST_ROOT=<td>` alone gives.
    pub fn single(trust_domain: &str) -> Result<TrustRoots> {
        let general = parse_list(TRUST_ROOT, trust_domain)?;
        Ok(TrustRoots {
            nexus: general.clone(),
            keeper: general.clone(),
            pilot: general.clone(),
            lite_workload: general.clone(),
            general,
        })
    }

    /// The first `SPIKE_TRUST_ROOT` entry: the trust domain to mint IDs in and
    /// to name in messages where one is needed.
    pub fn primary(&self) -> &str {
        // Every list is non-empty by construction (parse_list rejects empty entries and
        // `split` yields at least one).
        self.general
            .first()
            .map_or(DEFAULT_TRUST_DOMAIN, String::as_str)
    }

    /// The trust domains of peers with `role` (`Role::Workload`: `SPIKE_TRUST_ROOT`).
    pub fn domains_of(&self, role: Role) -> &[String] {
        match role {
            Role::Nexus => &self.nexus,
            Role::Keeper => &self.keeper,
            Role::Superuser | Role::Recover | Role::Restore => &self.pilot,
            Role::Workload => &self.general,
        }
    }

    /// The trust domains of lite workloads (`SPIKE_TRUST_ROOT_LITE_WORKLOAD`).
    pub fn lite_workload_domains(&self) -> &[String] {
        &self.lite_workload
    }

    /// The variable that configures `role`'s trust domains.
    pub fn variable_of(role: Role) -> &'static str {
        match role {
            Role::Nexus => TRUST_ROOT_NEXUS,
            Role::Keeper => TRUST_ROOT_KEEPER,
            Role::Superuser | Role::Recover | Role::Restore => TRUST_ROOT_PILOT,
            Role::Workload => TRUST_ROOT,
        }
    }

    /// Every configured trust domain, once each, in the order first listed
    /// (`SPIKE_TRUST_ROOT` first). Bundles for other trust domains are ignored.
    pub fn all_domains(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for list in [
            &self.general,
            &self.nexus,
            &self.keeper,
            &self.pilot,
            &self.lite_workload,
        ] {
            for td in list {
                if !out.contains(&td.as_str()) {
                    out.push(td);
                }
            }
        }
        out
    }

    /// True if any variable lists `trust_domain`.
    pub fn contains(&self, trust_domain: &str) -> bool {
        self.all_domains().contains(&trust_domain)
    }

    /// The variables that list `trust_domain`, for messages.
    pub fn variables_listing(&self, trust_domain: &str) -> Vec<&'static str> {
        let has = |l: &[String]| l.iter().any(|d| d == trust_domain);
        let mut out = Vec::new();
        for (var, list) in [
            (TRUST_ROOT, &self.general),
            (TRUST_ROOT_NEXUS, &self.nexus),
            (TRUST_ROOT_KEEPER, &self.keeper),
            (TRUST_ROOT_PILOT, &self.pilot),
            (TRUST_ROOT_LITE_WORKLOAD, &self.lite_workload),
        ] {
            if has(list) {
                out.push(var);
            }
        }
        out
    }

    /// The role `id` holds under this configuration, or `None` if its trust
    /// domain is not configured for any role it could hold (such a peer is
    /// refused at the TLS handshake).
    ///
    /// A named role needs its path (`/spike/nexus`, ... exact or followed by
    /// `/`) *and* a trust domain in that role's list. Anything else in a
    /// `SPIKE_TRUST_ROOT` domain is a workload, as is a lite workload in a
    /// `SPIKE_TRUST_ROOT_LITE_WORKLOAD` domain; a path that looks like a
    /// named role from a domain not listed for that role is an ordinary
    /// workload there, as in SPIKE.
    pub fn role_of(&self, id: &SpiffeId) -> Option<Role> {
        let td = id.trust_domain();
        for role in [
            Role::Nexus,
            Role::Keeper,
            Role::Superuser,
            Role::Recover,
            Role::Restore,
        ] {
            if self.domains_of(role).iter().any(|d| d == td) && Role::of(id, td) == Some(role) {
                return Some(role);
            }
        }
        if self.general.iter().any(|d| d == td) || self.is_lite_workload(id) {
            return Some(Role::Workload);
        }
        None
    }

    /// True if `id` is a SPIKE "lite" workload
    /// (`spiffe://<td>/spike/workload/role/lite[/...]` with `<td>` in
    /// `SPIKE_TRUST_ROOT_LITE_WORKLOAD`): the cipher API without policies.
    pub fn is_lite_workload(&self, id: &SpiffeId) -> bool {
        self.lite_workload.iter().any(|d| d == id.trust_domain())
            && id
                .path()
                .strip_prefix(LITE_PATH)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Why `id` does not have one of `allowed` roles, in one sentence for a
    /// handshake error.
    pub(super) fn explain_refusal(&self, id: &SpiffeId, allowed: &[Role]) -> String {
        let held = self.role_of(id);
        let mut reason = match held {
            Some(r) => format!("its role is {r}"),
            None => format!(
                "its trust domain {} is in none of the SPIKE_TRUST_ROOT* lists ({})",
                id.trust_domain(),
                self.all_domains().join(", ")
            ),
        };
        let names: Vec<String> = allowed.iter().map(|r| r.to_string()).collect();
        reason.push_str(&format!(", allowed: {}", names.join(", ")));
        // The path says a role the trust domain may not hold: name the variable.
        for &want in allowed {
            if Role::of(id, id.trust_domain()) == Some(want) && want != Role::Workload {
                reason.push_str(&format!(
                    " ({} allows {want} IDs from {} only)",
                    TrustRoots::variable_of(want),
                    self.domains_of(want).join(", ")
                ));
            }
        }
        reason
    }
}

impl fmt::Display for TrustRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workloads {}; nexus {}; keeper {}; pilot {}; lite workload {}",
            self.general.join(","),
            self.nexus.join(","),
            self.keeper.join(","),
            self.pilot.join(","),
            self.lite_workload.join(",")
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn roots(vars: &[(&str, &str)]) -> Result<TrustRoots> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TrustRoots::from_lookup(&|n| map.get(n).cloned())
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn defaults_to_spike_ist_everywhere() {
        let t = roots(&[]).unwrap();
        assert_eq!(t, TrustRoots::single("spike.ist").unwrap());
        assert_eq!(t.primary(), "spike.ist");
        assert_eq!(t.all_domains(), ["spike.ist"]);
        for r in [Role::Nexus, Role::Keeper, Role::Superuser, Role::Workload] {
            assert_eq!(t.domains_of(r), ["spike.ist"]);
        }
    }

    #[test]
    fn role_variables_fall_back_to_the_primary_domain() {
        let t = roots(&[(TRUST_ROOT, "a.org, b.org"), (TRUST_ROOT_KEEPER, "k.org")]).unwrap();
        assert_eq!(t.primary(), "a.org");
        assert_eq!(t.domains_of(Role::Workload), ["a.org", "b.org"]);
        assert_eq!(t.domains_of(Role::Nexus), ["a.org"]);
        assert_eq!(t.domains_of(Role::Keeper), ["k.org"]);
        assert_eq!(t.domains_of(Role::Recover), ["a.org"]);
        assert_eq!(t.lite_workload_domains(), ["a.org"]);
        // b.org's role paths are ordinary workloads: listing it admits no operator.
        for path in ["spike/pilot/role/superuser", "spike/nexus", "spike/keeper"] {
            let b = id(&format!("spiffe://b.org/{path}"));
            assert_eq!(t.role_of(&b), Some(Role::Workload), "{path}");
        }
        assert!(!t.is_lite_workload(&id("spiffe://b.org/spike/workload/role/lite")));
        assert_eq!(t.all_domains(), ["a.org", "b.org", "k.org"]);
        assert!(t.contains("k.org") && !t.contains("c.org"));
        assert_eq!(
            t.variables_listing("a.org"),
            [
                TRUST_ROOT,
                TRUST_ROOT_NEXUS,
                TRUST_ROOT_PILOT,
                TRUST_ROOT_LITE_WORKLOAD
            ]
        );
        assert_eq!(t.variables_listing("k.org"), [TRUST_ROOT_KEEPER]);
    }

    #[test]
    fn lists_are_trimmed_and_deduplicated() {
        let t = roots(&[(TRUST_ROOT, " a.org ,b.org,a.org")]).unwrap();
        assert_eq!(t.domains_of(Role::Workload), ["a.org", "b.org"]);
    }

    #[test]
    fn bad_lists_name_the_variable() {
        for (var, value, want) in [
            (TRUST_ROOT, "a.org,", "empty entry"),
            (TRUST_ROOT_NEXUS, "spiffe://a.org", "not a spiffe:// ID"),
            (TRUST_ROOT_PILOT, "A.org", "lowercase"),
            (TRUST_ROOT_KEEPER, "a.org:443", "port"),
            (TRUST_ROOT_LITE_WORKLOAD, "a b", "not allowed"),
        ] {
            let e = roots(&[(var, value)]).unwrap_err().to_string();
            assert!(e.starts_with(var), "{e}");
            assert!(e.contains(want), "{var}={value}: {e}");
        }
        assert!(TrustRoots::single("").is_err());
    }

    #[test]
    fn roles_follow_their_own_lists() {
        let t = roots(&[
            (TRUST_ROOT, "app.org"),
            (TRUST_ROOT_NEXUS, "core.org"),
            (TRUST_ROOT_KEEPER, "core.org,keep.org"),
            (TRUST_ROOT_PILOT, "ops.org"),
            (TRUST_ROOT_LITE_WORKLOAD, "lite.org"),
        ])
        .unwrap();
        let cases = [
            ("spiffe://core.org/spike/nexus", Some(Role::Nexus)),
            ("spiffe://core.org/spike/nexus/2", Some(Role::Nexus)),
            ("spiffe://core.org/spike/keeper/1", Some(Role::Keeper)),
            ("spiffe://keep.org/spike/keeper", Some(Role::Keeper)),
            (
                "spiffe://ops.org/spike/pilot/role/superuser",
                Some(Role::Superuser),
            ),
            (
                "spiffe://ops.org/spike/pilot/role/recover",
                Some(Role::Recover),
            ),
            (
                "spiffe://ops.org/spike/pilot/role/restore/x",
                Some(Role::Restore),
            ),
            ("spiffe://app.org/web", Some(Role::Workload)),
            // A role's path from a domain that may not hold the role: a workload
            // where workloads are allowed, nobody elsewhere.
            ("spiffe://app.org/spike/nexus", Some(Role::Workload)),
            (
                "spiffe://app.org/spike/pilot/role/superuser",
                Some(Role::Workload),
            ),
            ("spiffe://ops.org/spike/nexus", None),
            ("spiffe://keep.org/spike/nexus", None),
            ("spiffe://core.org/app", None),
            ("spiffe://ops.org/app", None),
            (
                "spiffe://lite.org/spike/workload/role/lite",
                Some(Role::Workload),
            ),
            (
                "spiffe://lite.org/spike/workload/role/lite/7",
                Some(Role::Workload),
            ),
            ("spiffe://lite.org/spike/workload/role/litex", None),
            ("spiffe://lite.org/app", None),
            ("spiffe://other.org/spike/nexus", None),
        ];
        for (s, want) in cases {
            assert_eq!(t.role_of(&id(s)), want, "{s}");
        }
        assert!(t.is_lite_workload(&id("spiffe://lite.org/spike/workload/role/lite")));
        assert!(!t.is_lite_workload(&id("spiffe://app.org/spike/workload/role/lite")));
        assert!(!t.is_lite_workload(&id("spiffe://lite.org/spike/workload/role")));
    }

    #[test]
    fn single_domain_matches_role_of() {
        let t = TrustRoots::single("spike.ist").unwrap();
        for s in [
            "spiffe://spike.ist/spike/nexus",
            "spiffe://spike.ist/spike/keeper/3",
            "spiffe://spike.ist/spike/pilot/role/restore",
            "spiffe://spike.ist/spike/nexusx",
            "spiffe://spike.ist/app",
            "spiffe://other.org/spike/nexus",
        ] {
            let i = id(s);
            assert_eq!(t.role_of(&i), Role::of(&i, "spike.ist"), "{s}");
        }
    }

    #[test]
    fn refusals_name_the_variable() {
        let t = roots(&[(TRUST_ROOT, "a.org"), (TRUST_ROOT_NEXUS, "n.org")]).unwrap();
        let r = t.explain_refusal(&id("spiffe://a.org/spike/nexus"), &[Role::Nexus]);
        assert!(r.contains("its role is workload"), "{r}");
        assert!(
            r.contains("SPIKE_TRUST_ROOT_NEXUS allows nexus IDs from n.org only"),
            "{r}"
        );
        let r = t.explain_refusal(&id("spiffe://x.org/app"), &[Role::Workload]);
        assert!(r.contains("x.org is in none of"), "{r}");
    }
}
