//! `spike policy create|apply|list|get|delete`.
//!
//! Text output (stdout unless said otherwise):
//! - `create` / `apply`: nothing on stdout; `saved policy NAME` on stderr, after a warning for
//!   each pattern that is not anchored with `^...$` (SPIKE's patterns match anywhere).
//! - `get`: a `field:  value` block (name, spiffeid pattern, path pattern, permissions,
//!   created, updated).
//! - `list`: a `NAME PERMISSIONS SPIFFEID-PATTERN PATH-PATTERN` table; nothing when empty.
//! - `delete`: nothing on stdout; `deleted policy NAME` on stderr.
//!
//! `--format json` prints the response object: `{}` for create, apply and delete, SPIKE's policy
//! object for get (with its `spiffiedPattern` key), `{"policies":[..]}` for list.
//!
//! Permissions and patterns are checked before anything is sent, so a typo exits 2 with a
//! precise message instead of a bare 400 or 500 from Nexus.

use std::path::Path;

use super::args::{Format, PolicyCommand};
use super::run::{Error, Op, Result, connect, nexus_failure, print_json, stdout, table};
use crate::protocol::nexus::ErrorCode;
use crate::protocol::nexus::{
    Empty, Policy, PolicyListRequest, PolicyListResponse, PolicyPutRequest,
};
use crate::protocol::policy::{self as rules, ACL_PATH};

const INVALID_POLICY: &str = "check the name (letters, digits, '-', '_' and spaces), the patterns \
                              and the permissions";

/// Checks a policy before it is sent, by the rules Nexus applies ([`rules::validate`]), so a
/// typo exits 2 here instead of a 400 from Nexus. Permissions come back deduplicated.
pub fn validate(mut policy: PolicyPutRequest) -> std::result::Result<PolicyPutRequest, String> {
    policy.permissions.retain(|p| !p.trim().is_empty());
    // The rules' errors never repeat a field's value (Nexus logs them); here the value is the
    // user's own, and naming it helps.
    if let Some(bad) = policy
        .permissions
        .iter()
        .find(|p| rules::Permission::parse(p.trim()).is_none())
    {
        return Err(format!(
            "invalid permission {bad:?}: expected read, write, list, execute or super"
        ));
    }
    let permissions = rules::validate(&policy)?;
    policy.permissions = permissions.iter().map(|p| p.as_str().to_string()).collect();
    Ok(policy)
}

/// One warning per pattern that is not anchored at both ends: SPIKE's patterns match anywhere
/// in the SPIFFE ID or path, so `spiffe://spike.ist/app` also matches `.../app-evil`.
pub fn anchoring_warnings(policy: &PolicyPutRequest) -> Vec<String> {
    let mut out = Vec::new();
    for (flag, what, pattern) in [
        (
            "spiffeid pattern",
            "every SPIFFE ID",
            &policy.spiffeid_pattern,
        ),
        ("path pattern", "every path", &policy.path_pattern),
    ] {
        let anchored = pattern.starts_with('^') && pattern.ends_with('$');
        // `.*` is a deliberate catch-all: anchoring would not change what it matches.
        if !anchored && pattern != ".*" {
            out.push(format!(
                "warning: the {flag} {pattern:?} is not anchored, so it matches {what} that \
                 contains a match; write ^...$ to match whole values"
            ));
        }
    }
    out
}

/// Parses a policy file: YAML or JSON (JSON is YAML), `{name, spiffeidPattern, pathPattern,
/// permissions: [...]}` as SPIKE's `policy apply` reads it.
pub fn parse_policy_file(text: &str) -> std::result::Result<PolicyPutRequest, String> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        format!("expected {{name, spiffeidPattern, pathPattern, permissions: [...]}} ({e})")
    })
}

fn read_policy_file(file: &Path) -> Result<PolicyPutRequest> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display())))?;
    let policy =
        parse_policy_file(&text).map_err(|e| Error::Usage(format!("{}: {e}", file.display())))?;
    validate(policy).map_err(|e| Error::Usage(format!("{}: {e}", file.display())))
}

fn acl_op(permission: &'static str, subject: String, write: bool) -> Op<'static> {
    Op {
        permission,
        resource: ACL_PATH,
        subject,
        invalid_hint: INVALID_POLICY,
        write,
    }
}

/// Runs one `spike policy` command.
pub async fn run(format: Format, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Create {
            name,
            spiffeid_pattern,
            path_pattern,
            permissions,
        } => {
            let policy = validate(PolicyPutRequest {
                name,
                spiffeid_pattern,
                path_pattern,
                permissions,
            })
            .map_err(Error::Usage)?;
            put(format, policy).await
        }
        PolicyCommand::Apply { file } => put(format, read_policy_file(&file)?).await,
        PolicyCommand::Get { name } => {
            let client = connect().await?;
            let policy = client.policy_get(&name).await.map_err(|e| {
                nexus_failure(&client, &acl_op("read", format!("policy {name}"), false), e)
            })?;
            match format {
                Format::Json => print_json(&policy),
                Format::Text => stdout(format_policy(&policy).as_bytes()),
            }
        }
        PolicyCommand::List {
            spiffeid_pattern,
            path_pattern,
        } => {
            let client = connect().await?;
            let filter = PolicyListRequest {
                spiffeid_pattern,
                path_pattern,
            };
            let resp = client.policy_list(&filter).await.map_err(|e| {
                nexus_failure(&client, &acl_op("list", "the policy list".into(), false), e)
            })?;
            match format {
                Format::Json => print_json(&resp),
                Format::Text => stdout(format_list(&resp).as_bytes()),
            }
        }
        PolicyCommand::Delete { name } => {
            let client = connect().await?;
            client.policy_delete(&name).await.map_err(|e| {
                nexus_failure(&client, &acl_op("write", format!("policy {name}"), true), e)
            })?;
            match format {
                Format::Json => print_json(&Empty {}),
                Format::Text => {
                    eprintln!("deleted policy {name}");
                    Ok(())
                }
            }
        }
    }
}

async fn put(format: Format, policy: PolicyPutRequest) -> Result<()> {
    for warning in anchoring_warnings(&policy) {
        eprintln!("spike: {warning}");
    }
    let client = connect().await?;
    let op = Op {
        invalid_hint: "check the name, the patterns and the permissions; a policy that reaches a \
                       spike/system/ path needs a path pattern matching it whole and an anchored \
                       SPIFFE ID pattern",
        ..acl_op("write", format!("policy {}", policy.name), true)
    };
    client.policy_put(&policy).await.map_err(|e| {
        if e.code() == Some(ErrorCode::ApiInternalError) {
            // SPIKE answers 500 for a pattern it cannot compile or a reserved-path violation.
            Error::Failed(format!(
                "Nexus could not save policy {} (api_internal_error): {}; its log has the details",
                policy.name, op.invalid_hint
            ))
        } else {
            nexus_failure(&client, &op, e)
        }
    })?;
    match format {
        Format::Json => print_json(&Empty {}),
        Format::Text => {
            eprintln!("saved policy {}", policy.name);
            Ok(())
        }
    }
}

/// The `field:  value` block of `policy get`.
pub fn format_policy(p: &Policy) -> String {
    table(&[
        vec!["name:".into(), p.name.clone()],
        vec!["spiffeid pattern:".into(), p.spiffeid_pattern.clone()],
        vec!["path pattern:".into(), p.path_pattern.clone()],
        vec!["permissions:".into(), p.permissions.join(",")],
        vec!["created:".into(), p.created_at.clone()],
        vec!["updated:".into(), p.updated_at.clone()],
    ])
}

/// The table of `policy list`; empty when there is no policy.
pub fn format_list(resp: &PolicyListResponse) -> String {
    if resp.policies.is_empty() {
        return String::new();
    }
    let mut rows = vec![vec![
        "NAME".to_string(),
        "PERMISSIONS".into(),
        "SPIFFEID-PATTERN".into(),
        "PATH-PATTERN".into(),
    ]];
    rows.extend(resp.policies.iter().map(|p| {
        vec![
            p.name.clone(),
            p.permissions.join(","),
            p.spiffeid_pattern.clone(),
            p.path_pattern.clone(),
        ]
    }));
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(id: &str, path: &str) -> PolicyPutRequest {
        PolicyPutRequest {
            name: "web".into(),
            spiffeid_pattern: id.into(),
            path_pattern: path.into(),
            permissions: vec!["read".into()],
        }
    }

    #[test]
    fn policy_files_in_yaml_and_json() {
        let yaml = "name: web\nspiffeidPattern: ^spiffe://spike\\.ist/app/web$\n\
                    pathPattern: ^secrets/web/.*$\npermissions:\n  - read\n  - list\n";
        let p = parse_policy_file(yaml).unwrap();
        assert_eq!(p.name, "web");
        assert_eq!(p.spiffeid_pattern, "^spiffe://spike\\.ist/app/web$");
        assert_eq!(p.path_pattern, "^secrets/web/.*$");
        assert_eq!(p.permissions, ["read", "list"]);
        let json = r#"{"name":"web","spiffeidPattern":"^spiffe://spike.ist/a$",
                       "pathPattern":"^s/.*$","permissions":["write"]}"#;
        let p = parse_policy_file(json).unwrap();
        assert_eq!(p.permissions, ["write"]);
        assert_eq!(p.spiffeid_pattern, "^spiffe://spike.ist/a$");
        let err =
            parse_policy_file("name: web\npathPattern: x\npermissions: [read]\n").unwrap_err();
        assert!(err.contains("spiffeidPattern"), "{err}");
        assert!(parse_policy_file("- a\n- b\n").is_err());
    }

    #[test]
    fn the_rules_are_nexuss_rules() {
        let with_perms = |p: &[&str]| PolicyPutRequest {
            permissions: p.iter().map(|s| s.to_string()).collect(),
            ..policy("^spiffe://spike.ist/a$", "^s/.*$")
        };
        assert_eq!(
            validate(with_perms(&["read", " list", "read", ""]))
                .unwrap()
                .permissions,
            ["read", "list"]
        );
        let err = validate(with_perms(&["read", "admin"])).unwrap_err();
        assert!(err.contains("\"admin\""), "{err}");
        assert!(validate(with_perms(&[])).is_err());
        assert!(validate(with_perms(&[""])).is_err());
        assert!(validate(policy("^spiffe://spike.ist/a$", "^s/.*$")).is_ok());
        let err = validate(policy("spiffe://(", "x")).unwrap_err();
        assert!(err.contains("spiffeidPattern"), "{err}");
        assert!(validate(policy("x", "")).is_err());
        // What the CLI used to accept and Nexus refuses: a pattern that is not a SPIFFE ID, a
        // path pattern with characters no path has, a reserved path reached by accident.
        for (id, path) in [
            ("web", "^s/.*$"),
            ("^spiffe://spike.ist/a$", "^s/ x$"),
            ("spiffe://spike.ist/a", "system"),
        ] {
            assert!(validate(policy(id, path)).is_err(), "{id} {path}");
        }
    }

    #[test]
    fn unanchored_patterns_are_warned_about() {
        assert!(anchoring_warnings(&policy("^spiffe://spike.ist/a$", "^s/.*$")).is_empty());
        assert!(anchoring_warnings(&policy("^spiffe://spike.ist/a$", ".*")).is_empty());
        let w = anchoring_warnings(&policy("spiffe://spike.ist/a", "^s/.*$"));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("spiffeid pattern \"spiffe://spike.ist/a\" is not anchored"));
        let w = anchoring_warnings(&policy("^spiffe://spike.ist/a", "secrets/"));
        assert_eq!(w.len(), 2);
        assert!(w[1].contains("every path"));
    }
}
