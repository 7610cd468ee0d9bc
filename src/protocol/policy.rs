//! The policy rules both ends apply: permissions, the reserved pseudo-paths, pattern syntax and
//! limits, and what a policy may reach (SPIKE's semantics, DESIGN.md §4, reference §6.2–6.3).
//!
//! - Patterns are regular expressions matched anywhere in the string unless anchored
//!   (`^...$`), compiled with a size limit.
//! - Permissions: `read`, `write`, `list`, `execute`, `super` (everything). A policy grants a
//!   request when both patterns match and it holds every wanted permission (or `super`); there
//!   are no deny rules.
//! - The reserved pseudo-paths `spike/system/acl` (policy management), `spike/system/secret`
//!   (listing) and `spike/system/cipher/exec` (the cipher) are reachable only by a policy whose
//!   path pattern matches them as a whole (`^(?:pattern)$`) and whose SPIFFE-ID pattern is
//!   anchored or a deliberate catch-all. Policies that would reach them by substring accident
//!   are refused at creation (here, so the CLI refuses them too) and ignored at check time.
//!
//! Nothing here memoises: [`compile`] builds a new program each time. Nexus keeps compiled
//! patterns with the decoded policies they belong to (`nexus::book`), so their lifetime is that
//! of the policy set they were compiled for.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use super::nexus::PolicyPutRequest;

/// Policy management is authorised on this pseudo-path.
pub const ACL_PATH: &str = "spike/system/acl";
/// `list` here lets a caller list every secret path (SPIKE's rule).
pub const SECRET_LIST_PATH: &str = "spike/system/secret";
/// `execute` here lets a caller use the cipher.
pub const CIPHER_PATH: &str = "spike/system/cipher/exec";
const RESERVED: [&str; 3] = [ACL_PATH, SECRET_LIST_PATH, CIPHER_PATH];

/// Compiled-program size limit for one pattern.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const MAX_PATTERN_LEN: usize = 500;
const MAX_NAME_LEN: usize = 250;

/// What a policy grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Read secrets (and policies, on [`ACL_PATH`]).
    Read,
    /// Write secrets (and policies, on [`ACL_PATH`]).
    Write,
    /// List secret paths (and policies, on [`ACL_PATH`]).
    List,
    /// Use the cipher (on [`CIPHER_PATH`]).
    Execute,
    /// Everything.
    Super,
}

impl Permission {
    /// The permission named `s` (lowercase, as on the wire).
    pub fn parse(s: &str) -> Option<Permission> {
        Some(match s {
            "read" => Permission::Read,
            "write" => Permission::Write,
            "list" => Permission::List,
            "execute" => Permission::Execute,
            "super" => Permission::Super,
            _ => return None,
        })
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::List => "list",
            Permission::Execute => "execute",
            Permission::Super => "super",
        }
    }
}

/// Compiles `pattern` under the size limits.
pub fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

fn full_match(pattern: &str, text: &str) -> bool {
    compile(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(text))
}

/// Whether a SPIFFE-ID pattern is anchored at both ends or deliberately matches anything.
fn id_pattern_is_deliberate(pattern: &str) -> bool {
    (pattern.starts_with('^') && pattern.ends_with('$'))
        || full_match(pattern, "spiffe://catch-all.probe.invalid/any/path/at-all")
}

/// May a policy with these patterns reach the reserved `path`? (Only asked when the path
/// pattern matched.) Compiles patterns: callers that ask often keep the answer
/// ([`reserved_reach`]).
pub fn reserved_ok(spiffeid_pattern: &str, path_pattern: &str, path: &str) -> bool {
    !is_reserved(path)
        || (full_match(path_pattern, path) && id_pattern_is_deliberate(spiffeid_pattern))
}

/// Whether `path` is one of the reserved pseudo-paths.
pub fn is_reserved(path: &str) -> bool {
    RESERVED.contains(&path)
}

/// For a policy with these patterns, which reserved pseudo-paths it may reach, in the order
/// [`ACL_PATH`], [`SECRET_LIST_PATH`], [`CIPHER_PATH`]: its path pattern must match the path
/// and [`reserved_ok`] must hold.
pub fn reserved_reach(spiffeid_pattern: &str, path_pattern: &str) -> [bool; 3] {
    let matches = compile(path_pattern).ok();
    RESERVED.map(|r| {
        matches.as_ref().is_some_and(|re| re.is_match(r))
            && reserved_ok(spiffeid_pattern, path_pattern, r)
    })
}

/// The index of a reserved pseudo-path in [`reserved_reach`]'s answer.
pub fn reserved_index(path: &str) -> Option<usize> {
    RESERVED.iter().position(|r| *r == path)
}

fn spiffe_pattern_syntax_ok(p: &str) -> bool {
    // SPIKE's shape check: optional '^', literal "spiffe://", then a restricted character set,
    // optional '$'.
    let body = p.strip_prefix('^').unwrap_or(p);
    let body = body.strip_suffix('$').unwrap_or(body);
    let Some(rest) = body.strip_prefix("spiffe://") else {
        return false;
    };
    !rest.is_empty()
        && rest.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '\\' | '.' | '-' | '*' | '(' | ')' | '+' | '?' | '[' | ']' | '/' | '_'
                )
        })
}

fn path_pattern_syntax_ok(p: &str) -> bool {
    // Secret-path characters plus the anchors.
    p.chars()
        .all(|c| super::secret::is_path_char(c) || c == '^' || c == '$')
}

/// Validates a policy name (SPIKE's rule).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ' '))
    {
        return Err("invalid policy name: 1 to 250 letters, digits, '-', '_' or spaces".into());
    }
    Ok(())
}

/// Checks a policy against every rule — name, pattern syntax and size, permissions, reserved
/// paths — and returns its permissions, deduplicated in the order given. The one definition:
/// Nexus refuses what fails here with 400, and the CLI refuses it before sending.
///
/// An error names the field (and, for a permission, its position) but never repeats what the
/// field held: Nexus logs these errors, and the request body is the caller's, of any length.
pub fn validate(req: &PolicyPutRequest) -> Result<Vec<Permission>, String> {
    let bad = |m: String| Err(m);
    validate_name(&req.name)?;
    let id = &req.spiffeid_pattern;
    let path = &req.path_pattern;
    if id.is_empty() || id.len() > MAX_PATTERN_LEN || !spiffe_pattern_syntax_ok(id) {
        return bad("invalid spiffeidPattern: must start with spiffe:// (optionally ^) and use only letters, digits and .-_/*()+?[]\\".into());
    }
    if path.is_empty() || path.len() > MAX_PATTERN_LEN || !path_pattern_syntax_ok(path) {
        return bad(
            "invalid pathPattern: 1 to 500 of letters, digits and ._-/^$()?+*|[]{}\\".into(),
        );
    }
    for (what, p) in [("spiffeidPattern", id), ("pathPattern", path)] {
        if let Err(e) = compile(p) {
            let reason = match e {
                regex::Error::CompiledTooBig(_) => "too large once compiled".to_string(),
                _ => "not a valid regular expression".to_string(),
            };
            return bad(format!("invalid {what}: {reason}"));
        }
    }
    let mut permissions = Vec::new();
    for (i, p) in req.permissions.iter().enumerate() {
        let perm = Permission::parse(p.trim()).ok_or_else(|| {
            format!(
                "invalid permission (permissions[{i}]): expected read, write, list, execute or super"
            )
        })?;
        if !permissions.contains(&perm) {
            permissions.push(perm);
        }
    }
    if permissions.is_empty() {
        return bad("a policy needs at least one permission".into());
    }
    // Refuse policies that would reach a reserved path by substring accident.
    let path_re = compile(path).map_err(|_| "invalid pathPattern".to_string())?;
    for reserved in RESERVED {
        if path_re.is_match(reserved) && !reserved_ok(id, path, reserved) {
            return bad(format!(
                "pathPattern matches the reserved path {reserved} by accident: write ^{reserved}$ (or ^spike/system/.*$) and anchor spiffeidPattern with ^...$ to grant it"
            ));
        }
    }
    Ok(permissions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_but_never_repeat_its_value() {
        let marker = "MARKER-IN-THE-BODY";
        let base = PolicyPutRequest {
            name: "p".into(),
            spiffeid_pattern: "^spiffe://spike\\.ist/app/w$".into(),
            path_pattern: "^secrets/.*$".into(),
            permissions: vec!["read".into()],
        };
        let long = format!("{marker}{}", "x".repeat(10_000));
        let cases = [
            PolicyPutRequest {
                permissions: vec!["read".into(), long.clone()],
                ..base.clone()
            },
            PolicyPutRequest {
                path_pattern: format!("{marker}|spike/system/a"),
                ..base.clone()
            },
            PolicyPutRequest {
                path_pattern: format!("{marker}("),
                ..base.clone()
            },
            PolicyPutRequest {
                spiffeid_pattern: format!("spiffe://{marker}("),
                ..base.clone()
            },
            PolicyPutRequest {
                name: long.clone(),
                ..base.clone()
            },
        ];
        for req in cases {
            let err = validate(&req).unwrap_err();
            assert!(!err.contains(marker), "{err}");
            assert!(err.len() < 300, "{err}");
        }
        let err = validate(&PolicyPutRequest {
            permissions: vec!["read".into(), long],
            ..base
        })
        .unwrap_err();
        assert!(err.contains("permissions[1]"), "{err}");
    }
}
