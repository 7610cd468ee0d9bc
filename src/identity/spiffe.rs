//! SPIFFE IDs (validated per the SPIFFE ID specification) and SPIKE roles.

use std::fmt;
use std::str::FromStr;

use super::{Error, Result};

const SCHEME_PREFIX: &str = "spiffe://";
const MAX_LEN: usize = 2048;

/// A validated SPIFFE ID such as `spiffe://spike.ist/spike/nexus`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    full: String,
    /// Byte offset where the path starts (end of the trust domain).
    path_start: usize,
}

fn invalid(id: &str, reason: impl Into<String>) -> Error {
    let shown = if id.len() > 120 {
        let mut end = 120;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &id[..end])
    } else {
        id.to_string()
    };
    Error::InvalidSpiffeId {
        id: shown,
        reason: reason.into(),
    }
}

/// Checks a trust domain name; returns a reason on failure.
pub(super) fn check_trust_domain(td: &str) -> std::result::Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".into());
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => {}
            'A'..='Z' => return Err("trust domain must be lowercase".into()),
            ':' => return Err("a port is not allowed in the trust domain".into()),
            '@' => return Err("userinfo is not allowed in the trust domain".into()),
            '?' => return Err("a query is not allowed".into()),
            '#' => return Err("a fragment is not allowed".into()),
            other => {
                return Err(format!(
                    "character {other:?} is not allowed in the trust domain (allowed: a-z 0-9 . _ -)"
                ));
            }
        }
    }
    Ok(())
}

/// Validates a trust domain name, for callers that take one as a string.
pub(super) fn validate_trust_domain(td: &str) -> Result<()> {
    check_trust_domain(td).map_err(|reason| Error::InvalidTrustDomain {
        trust_domain: td.to_string(),
        reason,
    })
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<SpiffeId> {
        if s.is_empty() {
            return Err(invalid(s, "empty string"));
        }
        if s.len() > MAX_LEN {
            return Err(invalid(
                s,
                format!("longer than {MAX_LEN} bytes ({} bytes)", s.len()),
            ));
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            return Err(invalid(s, "scheme must be \"spiffe://\""));
        };
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain(td).map_err(|r| invalid(s, r))?;
        if !path.is_empty() {
            // path starts with '/'; split the rest into segments.
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(invalid(
                        s,
                        if path.ends_with('/') {
                            "trailing '/' is not allowed"
                        } else {
                            "empty path segment"
                        },
                    ));
                }
                if seg == "." || seg == ".." {
                    return Err(invalid(s, "path segments \".\" and \"..\" are not allowed"));
                }
                for c in seg.chars() {
                    match c {
                        'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => {}
                        '?' => return Err(invalid(s, "a query is not allowed")),
                        '#' => return Err(invalid(s, "a fragment is not allowed")),
                        other => {
                            return Err(invalid(
                                s,
                                format!(
                                    "character {other:?} is not allowed in the path (allowed: A-Z a-z 0-9 . _ -)"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(SpiffeId {
            full: s.to_string(),
            path_start: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// The trust domain, e.g. `spike.ist`.
    pub fn trust_domain(&self) -> &str {
        &self.full[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The path: `""` or `"/a/b"`.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    /// The full ID, `spiffe://td/path`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// True if this ID equals `base` or is below it (`base` + `/` + more).
    fn is_under(&self, base: &str) -> bool {
        match self.full.strip_prefix(base) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<SpiffeId> {
        SpiffeId::parse(s)
    }
}

/// What a SPIFFE ID is allowed to be in SPIKE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `spiffe://TD/spike/nexus`
    Nexus,
    /// `spiffe://TD/spike/keeper` (optionally `/<n>`)
    Keeper,
    /// `spiffe://TD/spike/pilot/role/superuser`
    Superuser,
    /// `spiffe://TD/spike/pilot/role/recover`
    Recover,
    /// `spiffe://TD/spike/pilot/role/restore`
    Restore,
    /// Any other ID in the trust domain.
    Workload,
}

impl Role {
    const NAMED: [Role; 5] = [
        Role::Nexus,
        Role::Keeper,
        Role::Superuser,
        Role::Recover,
        Role::Restore,
    ];

    fn base_path(self) -> Option<&'static str> {
        match self {
            Role::Nexus => Some("/spike/nexus"),
            Role::Keeper => Some("/spike/keeper"),
            Role::Superuser => Some("/spike/pilot/role/superuser"),
            Role::Recover => Some("/spike/pilot/role/recover"),
            Role::Restore => Some("/spike/pilot/role/restore"),
            Role::Workload => None,
        }
    }

    /// The role of `id` in `trust_domain`; `None` if `id` belongs to another
    /// trust domain. Matching follows SPIKE: the ID equals the role's base ID
    /// or starts with base ID + `/`.
    pub fn of(id: &SpiffeId, trust_domain: &str) -> Option<Role> {
        if id.trust_domain() != trust_domain {
            return None;
        }
        let path = id.path();
        for role in Role::NAMED {
            if let Some(base) = role.base_path() {
                let under = match path.strip_prefix(base) {
                    Some(rest) => rest.is_empty() || rest.starts_with('/'),
                    None => false,
                };
                if under {
                    return Some(role);
                }
            }
        }
        Some(Role::Workload)
    }

    /// The base SPIFFE ID of this role, e.g. `spiffe://spike.ist/spike/nexus`;
    /// `None` for [`Role::Workload`].
    pub fn base_id(self, trust_domain: &str) -> Option<String> {
        self.base_path()
            .map(|p| format!("{SCHEME_PREFIX}{trust_domain}{p}"))
    }

    /// True if `id` has this role in `trust_domain`.
    pub fn matches(self, id: &SpiffeId, trust_domain: &str) -> bool {
        match self.base_id(trust_domain) {
            Some(base) => id.is_under(&base),
            None => Role::of(id, trust_domain) == Some(Role::Workload),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Nexus => "nexus",
            Role::Keeper => "keeper",
            Role::Superuser => "superuser",
            Role::Recover => "recover",
            Role::Restore => "restore",
            Role::Workload => "workload",
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let id = SpiffeId::parse("spiffe://spike.ist/spike/nexus").unwrap();
        assert_eq!(id.trust_domain(), "spike.ist");
        assert_eq!(id.path(), "/spike/nexus");
        assert_eq!(id.as_str(), "spiffe://spike.ist/spike/nexus");
        assert_eq!(id.to_string(), "spiffe://spike.ist/spike/nexus");

        let id: SpiffeId = "spiffe://example-1.org_x".parse().unwrap();
        assert_eq!(id.trust_domain(), "example-1.org_x");
        assert_eq!(id.path(), "");

        for ok in [
            "spiffe://a/B/c.d/e_f-g",
            "spiffe://td/...",
            "spiffe://td/a..b",
            "spiffe://td/.hidden",
        ] {
            SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN - "spiffe://td/".len()));
        assert_eq!(long.len(), MAX_LEN);
        SpiffeId::parse(&long).unwrap();
    }

    #[test]
    fn invalid_ids() {
        let too_long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("http://spike.ist/x", "scheme"),
            ("SPIFFE://spike.ist/x", "scheme"),
            ("spiffe://Spike.ist/x", "lowercase"),
            ("spiffe://spike.ist//x", "empty path segment"),
            ("spiffe://spike.ist/a/../b", "\"..\""),
            ("spiffe://spike.ist/a/./b", "\".\""),
            ("spiffe://spike.ist/a?x=1", "query"),
            ("spiffe://spike.ist/a#frag", "fragment"),
            ("spiffe://spike.ist:443/a", "port"),
            ("spiffe://user@spike.ist/a", "userinfo"),
            ("spiffe://spike.ist/a/", "trailing"),
            ("spiffe://spike.ist/", "trailing"),
            ("spiffe:///a", "empty"),
            ("spiffe://spike.ist/a b", "not allowed"),
            (&too_long, "longer than"),
        ];
        for (s, want) in cases {
            let err = SpiffeId::parse(s).expect_err(s).to_string();
            assert!(err.contains(want), "{s}: {err} (want {want})");
        }
    }

    fn role(s: &str) -> Option<Role> {
        Role::of(&SpiffeId::parse(s).unwrap(), "spike.ist")
    }

    #[test]
    fn roles() {
        assert_eq!(role("spiffe://spike.ist/spike/nexus"), Some(Role::Nexus));
        assert_eq!(role("spiffe://spike.ist/spike/nexus/1"), Some(Role::Nexus));
        assert_eq!(
            role("spiffe://spike.ist/spike/nexus/instance-1"),
            Some(Role::Nexus)
        );
        assert_eq!(
            role("spiffe://spike.ist/spike/nexusx"),
            Some(Role::Workload)
        );
        assert_eq!(role("spiffe://spike.ist/spike/keeper"), Some(Role::Keeper));
        assert_eq!(
            role("spiffe://spike.ist/spike/keeper/2"),
            Some(Role::Keeper)
        );
        assert_eq!(
            role("spiffe://spike.ist/spike/pilot/role/superuser"),
            Some(Role::Superuser)
        );
        assert_eq!(
            role("spiffe://spike.ist/spike/pilot/role/recover"),
            Some(Role::Recover)
        );
        assert_eq!(
            role("spiffe://spike.ist/spike/pilot/role/restore"),
            Some(Role::Restore)
        );
        assert_eq!(
            role("spiffe://spike.ist/spike/pilot/role"),
            Some(Role::Workload)
        );
        assert_eq!(role("spiffe://spike.ist/app/web"), Some(Role::Workload));
        assert_eq!(role("spiffe://spike.ist"), Some(Role::Workload));
        assert_eq!(role("spiffe://other.org/spike/nexus"), None);
        assert_eq!(role("spiffe://spike.ist.evil/spike/nexus"), None);

        assert_eq!(
            Role::Nexus.base_id("spike.ist").as_deref(),
            Some("spiffe://spike.ist/spike/nexus")
        );
        assert_eq!(
            Role::Restore.base_id("x.org").as_deref(),
            Some("spiffe://x.org/spike/pilot/role/restore")
        );
        assert_eq!(Role::Workload.base_id("spike.ist"), None);

        let n1 = SpiffeId::parse("spiffe://spike.ist/spike/nexus/1").unwrap();
        assert!(Role::Nexus.matches(&n1, "spike.ist"));
        assert!(!Role::Keeper.matches(&n1, "spike.ist"));
        assert!(!Role::Nexus.matches(&n1, "other.org"));
    }
}
